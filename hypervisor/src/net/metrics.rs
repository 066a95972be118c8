//! Prometheus metrics: the text exposition format (version 0.0.4) over a minimal HTTP/1.1
//! server that answers `GET /metrics` (and `HEAD`), one request per connection.
//!
//! Pure logic: [`parse_http_request`] reads a request head, [`respond`] builds the whole response
//! and [`render`] the page; [`respond_checked`] puts the management token check first (with
//! `mgmt_open=none`: `Authorization: Bearer <token>`, else 401 with `WWW-Authenticate: Bearer`,
//! or 429 with `Retry-After` for a rate-limited source); the transport (`net::iface`) moves the
//! bytes.
#![deny(unsafe_code)]

use alloc::string::String;
use core::fmt::{self, Write};
use core::net::Ipv4Addr;

use super::auth::{Denied, Gate};
use crate::stats::{ColoReport, GuestState, HypervisorStats};
use crate::vcpu::VmExit;

/// The longest request head accepted (request line and headers), in bytes.
pub const MAX_HEAD_BYTES: usize = 8192;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A request head that was understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest<'a> {
    /// `GET`, `HEAD`, ... (a token; methods are case-sensitive).
    pub method: &'a str,
    /// The request target as sent (origin-form `/metrics`, absolute-form
    /// `http://host:9100/metrics`, or `*` / `host:port` for OPTIONS / CONNECT).
    pub target: &'a str,
    /// The path of the target without the query (`/metrics`), `*` or the authority.
    pub path: &'a str,
    /// The `Authorization` header's value, if one was sent (at most one is accepted).
    pub authorization: Option<&'a str>,
}

/// Why a request head was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The head is not complete yet (no blank line).
    Incomplete,
    /// The head is longer than [`MAX_HEAD_BYTES`].
    TooLarge {
        /// Bytes received.
        len: usize,
    },
    /// The request line is not `METHOD TARGET HTTP/1.x`.
    BadRequestLine {
        /// The line as received (truncated, lossy).
        line: String,
    },
    /// The HTTP version's major number is not 1 (RFC 9110 §15.6.6: 505).
    VersionNotSupported {
        /// The version as sent.
        version: String,
    },
    /// A header line is not `name: value` (RFC 9112 §5: no space before the colon, no line
    /// folding, no control characters).
    BadHeader {
        /// The line as received (truncated, lossy).
        line: String,
    },
    /// An HTTP/1.1 request without a `Host` header (RFC 9112 §3.2).
    MissingHost,
    /// More than one `Host` header, or one with an invalid value (RFC 9112 §3.2).
    BadHost {
        /// The value (truncated, lossy), or `(repeated)`.
        value: String,
    },
    /// The peer closed its side in the middle of the head.
    Truncated,
    /// The head did not arrive whole within the request deadline (408).
    Timeout {
        /// The deadline, ms.
        deadline_ms: u64,
    },
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Incomplete => write!(f, "request head incomplete; expected a blank line after the headers"),
            Self::TooLarge { len } => {
                write!(f, "request head of {len} bytes is too large; expected at most {MAX_HEAD_BYTES} bytes")
            }
            Self::BadRequestLine { line } => {
                write!(f, "bad request line `{line}`; expected `GET /metrics HTTP/1.1`")
            }
            Self::VersionNotSupported { version } => {
                write!(f, "HTTP version `{version}` not supported; expected HTTP/1.0 or HTTP/1.1")
            }
            Self::BadHeader { line } => {
                write!(f, "bad header line `{line}`; expected `name: value` with no space before the colon")
            }
            Self::MissingHost => write!(f, "HTTP/1.1 request without a Host header; expected exactly one"),
            Self::BadHost { value } => {
                write!(f, "bad Host header `{value}`; expected exactly one, of the form host[:port]")
            }
            Self::Truncated => write!(f, "connection closed in the middle of the request head"),
            Self::Timeout { deadline_ms } => {
                write!(f, "request head not received within {deadline_ms} ms of its first byte")
            }
        }
    }
}

/// RFC 9110 §5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().copied().all(is_tchar)
}

/// RFC 3986 `host [ ":" port ]` characters (reg-name, IPv4, bracketed IPv6), possibly empty.
fn is_host_value(v: &[u8]) -> bool {
    v.iter().all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:%[]".contains(&b))
}

fn lossy80(bytes: &[u8]) -> String {
    crate::net::mgmt::lossy(&bytes[..bytes.len().min(80)])
}

/// Where the head ends: the index just past its blank line, skipping empty lines before the
/// request line (RFC 9112 §2.2). Lines end with LF, optionally preceded by CR.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut pos = 0;
    let mut seen_request_line = false;
    while let Some(nl) = buf[pos..].iter().position(|&b| b == b'\n') {
        let line = &buf[pos..pos + nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos += nl + 1;
        if line.is_empty() {
            if seen_request_line {
                return Some(pos);
            }
        } else {
            seen_request_line = true;
        }
    }
    None
}

/// Parses a request head from the bytes received so far (RFC 9112 §2-§5).
pub fn parse_http_request(buf: &[u8]) -> Result<HttpRequest<'_>, HttpError> {
    let Some(end) = head_end(buf) else {
        return Err(if buf.len() > MAX_HEAD_BYTES {
            HttpError::TooLarge { len: buf.len() }
        } else {
            HttpError::Incomplete
        });
    };
    if end > MAX_HEAD_BYTES {
        return Err(HttpError::TooLarge { len: end });
    }
    let mut lines = buf[..end].split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let raw = lines.by_ref().find(|l| !l.is_empty()).unwrap_or_default();
    let bad = || HttpError::BadRequestLine { line: lossy80(raw) };
    let line = core::str::from_utf8(raw).map_err(|_| bad())?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    if !is_token(method.as_bytes()) || target.is_empty() {
        return Err(bad());
    }
    let v = version.as_bytes();
    if !(v.len() == 8 && v.starts_with(b"HTTP/") && v[5].is_ascii_digit() && v[6] == b'.' && v[7].is_ascii_digit()) {
        return Err(bad());
    }
    if v[5] != b'1' {
        return Err(HttpError::VersionNotSupported { version: version.into() });
    }
    // HTTP/1.x with x > 1 is served as 1.1 (RFC 9110 §2.5).
    let http11 = v[7] != b'0';
    let path = if target.starts_with('/') {
        target
    } else if let Some(rest) = strip_prefix_ignore_case(target, "http://") {
        // absolute-form (RFC 9112 §3.2.2): servers MUST accept it; the path is what follows
        // the authority (an empty path is `/`).
        match rest.find(['/', '?']) {
            Some(i) if rest.as_bytes()[i] == b'/' => &rest[i..],
            _ => "/",
        }
    } else if (target == "*" && method == "OPTIONS") || (method == "CONNECT" && is_host_value(target.as_bytes())) {
        target
    } else {
        return Err(bad());
    };
    let path = path.split('?').next().unwrap_or(path);
    if path.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(bad());
    }
    let mut hosts = 0;
    let mut authorization = None;
    for header in lines.take_while(|l| !l.is_empty()) {
        let bad_header = || HttpError::BadHeader { line: lossy80(header) };
        let colon = header.iter().position(|&b| b == b':').ok_or_else(bad_header)?;
        let (name, value) = (&header[..colon], &header[colon + 1..]);
        // No whitespace before the colon; obs-fold (a line starting with SP/HTAB) refused.
        if !is_token(name) {
            return Err(bad_header());
        }
        let value = value.trim_ascii();
        if value.iter().any(|&b| b == 0x7f || (b < 0x20 && b != b'\t')) {
            return Err(bad_header());
        }
        if name.eq_ignore_ascii_case(b"host") {
            hosts += 1;
            if hosts > 1 {
                return Err(HttpError::BadHost { value: "(repeated)".into() });
            }
            if !is_host_value(value) {
                return Err(HttpError::BadHost { value: lossy80(value) });
            }
        } else if name.eq_ignore_ascii_case(b"authorization") {
            // Never echoed: the line may hold a token.
            let refused = || HttpError::BadHeader { line: "Authorization: (not shown)".into() };
            if authorization.is_some() {
                return Err(refused());
            }
            authorization = Some(core::str::from_utf8(value).map_err(|_| refused())?);
        }
    }
    if http11 && hosts == 0 {
        return Err(HttpError::MissingHost);
    }
    Ok(HttpRequest { method, target, path, authorization })
}

/// The token of an `Authorization: Bearer <token>` value (RFC 6750 §2.1: the scheme is
/// case-insensitive, then one or more spaces, then a token68).
pub fn bearer_token(value: &str) -> Option<&str> {
    let scheme = value.get(..6)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let rest = &value[6..];
    let token = rest.trim_start_matches(' ');
    (token.len() < rest.len() && !token.is_empty() && !token.contains([' ', '\t'])).then_some(token)
}

/// The response to a request head with the token check first: with `mgmt_open=none`, every
/// request that parsed needs `Authorization: Bearer <token>` (checked by `gate` for `peer` at
/// `now_ms`); a refusal never renders the page. A head that did not parse gets its error as
/// usual. Also returns the check's result when one was made (for the counters).
pub fn respond_checked(
    request: Result<HttpRequest<'_>, HttpError>,
    gate: &mut Gate,
    peer: Ipv4Addr,
    now_ms: u64,
    page: impl FnOnce() -> String,
) -> (String, Outcome, Option<Result<(), Denied>>) {
    if let Ok(req) = &request {
        if gate.reads_need_token() {
            let presented = req.authorization.and_then(bearer_token);
            let check = gate.check(peer, now_ms, presented.map(str::as_bytes), false);
            if let Err(denied) = check {
                return (denied_response(&denied, req.method == "HEAD"), Outcome::Refused, Some(check));
            }
            let (text, outcome) = respond(request, page);
            return (text, outcome, Some(check));
        }
    }
    let (text, outcome) = respond(request, page);
    (text, outcome, None)
}

/// 401 with `WWW-Authenticate: Bearer` (RFC 6750 §3; `error="invalid_token"` when a token was
/// sent), 429 with `Retry-After` for a rate-limited source, 403 when no token is configured.
pub fn denied_response(denied: &Denied, head_only: bool) -> String {
    let (status, extra) = match denied {
        Denied::Unauthorized { presented: false } => {
            ("401 Unauthorized", String::from("WWW-Authenticate: Bearer realm=\"colo\"\r\n"))
        }
        Denied::Unauthorized { presented: true } => {
            ("401 Unauthorized", String::from("WWW-Authenticate: Bearer realm=\"colo\", error=\"invalid_token\"\r\n"))
        }
        Denied::RateLimited { retry_after_ms } => (
            "429 Too Many Requests",
            crate::net::mgmt::format(format_args!("Retry-After: {}\r\n", retry_after_ms.div_ceil(1000).max(1))),
        ),
        Denied::NoTokenConfigured => ("403 Forbidden", String::new()),
    };
    let body = crate::net::mgmt::format(format_args!("{}: {denied}\n", denied.code()));
    let mut out = crate::net::mgmt::format(format_args!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    ));
    if !head_only {
        out.push_str(&body);
    }
    out
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// Methods RFC 9110 §9 defines: refused with 405 and `Allow`; any other token gets 501.
const KNOWN_METHODS: &[&str] = &["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"];

/// What `/metrics` allows.
pub const ALLOW: &str = "GET, HEAD";

/// What a response was, for the counters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The metrics page was served.
    Served,
    /// An error status was sent.
    Refused,
}

/// The whole HTTP response for `request` (or for a refused head), and whether it served the page.
pub fn respond(request: Result<HttpRequest<'_>, HttpError>, page: impl FnOnce() -> String) -> (String, Outcome) {
    let mut allow = false;
    let (status, body, outcome, head_only) = match request {
        Ok(HttpRequest { method, path, .. }) => match (method, path) {
            ("GET" | "HEAD", "/metrics") => ("200 OK", page(), Outcome::Served, method == "HEAD"),
            ("GET" | "HEAD", _) => (
                "404 Not Found",
                crate::net::mgmt::format(format_args!("no page `{path}`; expected /metrics\n")),
                Outcome::Refused,
                method == "HEAD",
            ),
            _ if KNOWN_METHODS.contains(&method) => {
                allow = true;
                (
                    "405 Method Not Allowed",
                    crate::net::mgmt::format(format_args!("method `{method}` not allowed; expected {ALLOW}\n")),
                    Outcome::Refused,
                    false,
                )
            }
            _ => (
                "501 Not Implemented",
                crate::net::mgmt::format(format_args!("method `{method}` not implemented; expected {ALLOW}\n")),
                Outcome::Refused,
                false,
            ),
        },
        Err(err) => {
            let status = match err {
                HttpError::TooLarge { .. } => "431 Request Header Fields Too Large",
                HttpError::VersionNotSupported { .. } => "505 HTTP Version Not Supported",
                HttpError::Timeout { .. } => "408 Request Timeout",
                _ => "400 Bad Request",
            };
            (status, crate::net::mgmt::format(format_args!("{err}\n")), Outcome::Refused, false)
        }
    };
    let content_type = if outcome == Outcome::Served { CONTENT_TYPE } else { "text/plain; charset=utf-8" };
    let mut out = crate::net::mgmt::format(format_args!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        body.len(),
        if allow { "Allow: GET, HEAD\r\n" } else { "" }
    ));
    if !head_only {
        out.push_str(&body);
    }
    (out, outcome)
}

/// Escapes a label value (`\`, `"` and newline).
fn label(out: &mut String, value: &str) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = write!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n");
}

/// The metrics page.
pub fn render(stats: &HypervisorStats, role: &str, uptime_ms: u64) -> String {
    let mut o = String::new();
    family(&mut o, "colo_up", "gauge", "Always 1 while the hypervisor serves metrics, labelled with its role.");
    o.push_str("colo_up{role=\"");
    label(&mut o, role);
    o.push_str("\"} 1\n");
    family(&mut o, "colo_uptime_seconds", "gauge", "Seconds since the hypervisor's clock started.");
    let _ = writeln!(o, "colo_uptime_seconds {}.{:03}", uptime_ms / 1000, uptime_ms % 1000);

    type NicField = fn(&crate::stats::NicCounters) -> u64;
    let nic_counters: [(&str, &str, NicField); 9] = [
        ("colo_nic_rx_frames_total", "Frames received by the host NIC.", |c| c.rx_frames),
        ("colo_nic_rx_bytes_total", "Bytes received by the host NIC.", |c| c.rx_bytes),
        ("colo_nic_tx_frames_total", "Frames sent by the host NIC.", |c| c.tx_frames),
        ("colo_nic_tx_bytes_total", "Bytes sent by the host NIC.", |c| c.tx_bytes),
        ("colo_nic_rx_dropped_total", "Received frames nobody wanted.", |c| c.rx_dropped),
        ("colo_nic_rx_errors_total", "Received frames that were malformed or flagged by the NIC.", |c| c.rx_errors),
        ("colo_nic_tx_dropped_total", "Frames not sent because the transmit ring was full.", |c| c.tx_dropped),
        ("colo_nic_tx_errors_total", "Frames not sent because they were empty or too large.", |c| c.tx_errors),
        ("colo_nic_tx_fenced_total", "Guest frames refused because this host is fenced.", |c| c.tx_fenced),
    ];
    for (name, help, get) in nic_counters {
        family(&mut o, name, "counter", help);
        for nic in &stats.nics {
            let _ = write!(o, "{name}{{nic=\"");
            label(&mut o, &nic.name);
            o.push_str("\",roles=\"");
            label(&mut o, &nic.roles);
            let _ = writeln!(o, "\"}} {}", get(&nic.counters));
        }
    }
    family(&mut o, "colo_nic_link_up", "gauge", "1 when the host NIC's link is up.");
    for nic in &stats.nics {
        o.push_str("colo_nic_link_up{nic=\"");
        label(&mut o, &nic.name);
        let _ = writeln!(o, "\"}} {}", u8::from(nic.link_up));
    }

    if let Some(f) = &stats.failover {
        let gauges: [(&str, &str, &str, u64); 8] = [
            ("colo_failover_generation", "gauge", "Pair generation this host is in.", f.generation),
            ("colo_failover_protected", "gauge", "1 while output is compared (protected).", u64::from(f.protected)),
            ("colo_failover_peer_alive", "gauge", "1 while the peer is heard.", u64::from(f.peer == "alive")),
            ("colo_failover_fenced", "gauge", "1 once this host fenced itself.", u64::from(f.fenced.is_some())),
            ("colo_failovers_total", "counter", "Takeovers by this host.", f.failovers),
            ("colo_witness_claims_total", "counter", "Witness claims sent.", f.claims[0]),
            ("colo_witness_claim_latency_ms", "gauge", "Round trip of the last answered claim.", f.last_latency_ms),
            (
                "colo_failover_stall_ms",
                "gauge",
                "Last takeover: peer last heard to first output.",
                f.stall_ms.unwrap_or(0),
            ),
        ];
        for (name, kind, help, value) in gauges {
            family(&mut o, name, kind, help);
            let _ = writeln!(o, "{name} {value}");
        }
    }

    family(&mut o, "colo_guest_state", "gauge", "1 for the state each guest is in, 0 for the others.");
    for g in &stats.guests {
        for state in GuestState::ALL {
            o.push_str("colo_guest_state{guest=\"");
            label(&mut o, &g.name);
            let _ = writeln!(o, "\",state=\"{}\"}} {}", state.name(), u8::from(g.state == state));
        }
    }
    family(&mut o, "colo_guest_exits_total", "counter", "VM exits of each guest, by kind.");
    for g in &stats.guests {
        for kind in VmExit::KIND_NAMES {
            o.push_str("colo_guest_exits_total{guest=\"");
            label(&mut o, &g.name);
            let _ = writeln!(o, "\",kind=\"{kind}\"}} {}", g.exits.get(kind));
        }
    }

    let m = &stats.mgmt;
    for (name, help, value) in [
        ("colo_mgmt_requests_total", "JSON management requests answered.", m.requests),
        ("colo_mgmt_request_errors_total", "JSON management requests answered with an error.", m.request_errors),
        ("colo_metrics_scrapes_total", "Metrics pages served.", m.scrapes),
        ("colo_metrics_http_errors_total", "HTTP requests refused by the metrics server.", m.http_errors),
    ] {
        family(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {value}");
    }
    family(
        &mut o,
        "colo_mgmt_connections_total",
        "counter",
        "Connections of the management servers, by server (json, http) and event (accepted, evicted, request_timeouts, idle_timeouts, not_reading, too_large, half_close_requests, full).",
    );
    for (server, counters) in [("json", &m.json), ("http", &m.http)] {
        for (event, value) in counters.named() {
            let _ = writeln!(o, "colo_mgmt_connections_total{{server=\"{server}\",event=\"{event}\"}} {value}");
        }
    }
    let h = &stats.heap;
    for (name, help, value) in [
        ("colo_heap_size_bytes", "Bytes the hypervisor heap manages.", h.size),
        ("colo_heap_used_bytes", "Bytes of the hypervisor heap allocated now.", h.used),
        ("colo_heap_free_bytes", "Bytes of the hypervisor heap free now.", h.free),
        ("colo_heap_high_water_bytes", "The most bytes of the hypervisor heap ever allocated at once.", h.high_water),
    ] {
        family(&mut o, name, "gauge", help);
        let _ = writeln!(o, "{name} {value}");
    }
    family(
        &mut o,
        "colo_mgmt_auth_total",
        "counter",
        "Management token checks (JSON API and metrics), by result (authorized, unauthorized, rate_limited, no_token_configured).",
    );
    for (result, value) in m.auth.named() {
        let _ = writeln!(o, "colo_mgmt_auth_total{{result=\"{result}\"}} {value}");
    }
    family(&mut o, "colo_heap_alloc_failures_total", "counter", "Allocations the hypervisor heap could not satisfy.");
    let _ = writeln!(o, "colo_heap_alloc_failures_total {}", h.alloc_failures);
    let t = &stats.tunables;
    for (name, help, ms) in [
        ("colo_tunable_heartbeat_seconds", "Heartbeat interval tunable.", t.heartbeat_ms),
        ("colo_tunable_checkpoint_seconds", "Periodic checkpoint interval tunable.", t.checkpoint_ms),
    ] {
        family(&mut o, name, "gauge", help);
        let _ = writeln!(o, "{name} {}.{:03}", ms / 1000, ms % 1000);
    }
    if let Some(c) = &stats.colo {
        colo(&mut o, c);
    }
    o
}

/// Seconds from µs, as `S.UUUUUU`.
fn seconds(o: &mut String, us: u64) {
    let _ = write!(o, "{}.{:06}", us / 1_000_000, us % 1_000_000);
}

/// The COLO families (`role=primary|secondary` only).
fn colo(o: &mut String, c: &ColoReport) {
    family(o, "colo_replication_link_state", "gauge", "1 for the replication link's state (down, handshake, syncing, colo), 0 for the others, labelled with this host's role.");
    for state in ["down", "handshake", "syncing", "colo"] {
        let _ = writeln!(
            o,
            "colo_replication_link_state{{role=\"{}\",state=\"{state}\"}} {}",
            c.role,
            u8::from(c.link == state)
        );
    }
    for (name, help, value) in [
        (
            "colo_replication_epoch",
            "Primary: the epoch the PVM runs in; secondary: the epoch the SVM runs in.",
            c.epoch,
        ),
        ("colo_replication_committed_epoch", "The last committed checkpoint's epoch.", c.committed),
        ("colo_comparator_held_frames", "PVM frames held by the comparator now.", c.held_frames),
        ("colo_checkpoint_last_pages", "Dirty pages of the last checkpoint.", c.pages_last),
        ("colo_checkpoint_last_bytes", "Stream bytes of the last checkpoint.", c.bytes_last),
    ] {
        family(o, name, "gauge", help);
        let _ = writeln!(o, "{name} {value}");
    }
    family(
        o,
        "colo_checkpoints_total",
        "counter",
        "Checkpoints started, by cause (mismatch, timeout, pressure, periodic, manual, full_sync).",
    );
    for (cause, n) in ColoReport::CAUSES.iter().zip(c.checkpoints_by_cause) {
        let _ = writeln!(o, "colo_checkpoints_total{{cause=\"{cause}\"}} {n}");
    }
    family(
        o,
        "colo_link_errors_total",
        "counter",
        "Malformed bytes on the replication link, by error; each closed the connection.",
    );
    for (error, n) in c.link_errors {
        o.push_str("colo_link_errors_total{error=\"");
        label(o, error);
        let _ = writeln!(o, "\"}} {n}");
    }
    for (name, help, value) in [
        ("colo_checkpoints_committed_total", "Checkpoints and full syncs committed.", c.checkpoints_committed),
        ("colo_checkpoints_aborted_total", "Checkpoints aborted (link lost or refused).", c.checkpoints_aborted),
        ("colo_full_syncs_total", "Full syncs completed.", c.full_syncs),
        ("colo_checkpoint_pages_total", "Dirty pages of all checkpoints.", c.pages_total),
        ("colo_checkpoint_bytes_total", "Stream bytes of all checkpoints.", c.bytes_total),
        (
            "colo_comparator_compared_bytes_total",
            "TCP payload bytes compared (stream bytes once, re-sent bytes again).",
            c.compared_bytes,
        ),
        ("colo_comparator_matched_bytes_total", "TCP stream bytes matched between PVM and SVM.", c.matched_bytes),
        ("colo_released_bytes_total", "Bytes of PVM frames released to clients.", c.released_bytes),
        ("colo_released_frames_total", "PVM frames released to clients.", c.released_frames),
        (
            "colo_released_by_checkpoint_frames_total",
            "PVM frames released by a committed checkpoint rather than a match.",
            c.released_by_checkpoint,
        ),
        ("colo_mirrored_frames_total", "Client frames mirrored to the secondary.", c.mirrored_frames),
        (
            "colo_input_dropped_frames_total",
            "Client frames refused because the link queue or the backlog was full.",
            c.input_dropped,
        ),
        ("colo_svm_frames_total", "SVM output frames sent (secondary) or received (primary).", c.svm_frames),
        ("colo_svm_dropped_frames_total", "SVM output frames dropped.", c.svm_frames_dropped),
        (
            "colo_link_protocol_errors_total",
            "Well-formed link messages that made no sense here; each closed the connection.",
            c.protocol_errors,
        ),
        (
            "colo_verify_failures_total",
            "Checkpoints whose checkpoint_verify digest differed after the apply.",
            c.verify_failures,
        ),
        ("colo_link_connects_total", "Replication link connections.", c.link_connects),
        ("colo_link_closes_total", "Replication link closures.", c.link_closes),
        (
            "colo_seq_rewritten_svm_frames_total",
            "SVM output frames whose TCP sequence numbers were translated (secondary).",
            c.seq_rewritten.0,
        ),
        (
            "colo_seq_rewritten_client_frames_total",
            "Mirrored client frames whose TCP acknowledgements were translated (secondary).",
            c.seq_rewritten.1,
        ),
        (
            "colo_seq_unknown_offset_frames_total",
            "TCP frames passed untranslated because the sequence offset was unknown (secondary).",
            c.seq_rewritten.2,
        ),
    ] {
        family(o, name, "counter", help);
        let _ = writeln!(o, "{name} {value}");
    }
    for (name, what, sample) in [
        ("colo_checkpoint_pause_seconds", "PVM pause per capture", c.pause_us),
        ("colo_checkpoint_transfer_seconds", "Checkpoint transfer, capture done to acknowledgement", c.transfer_us),
        ("colo_checkpoint_apply_seconds", "Checkpoint apply on the secondary", c.apply_us),
    ] {
        let help = crate::net::mgmt::format(format_args!("{what} (mean = sum / count)."));
        family(o, name, "summary", &help);
        let _ = write!(o, "{name}_sum ");
        seconds(o, sample.total);
        let _ = writeln!(o, "\n{name}_count {}", sample.count);
        let last = crate::net::mgmt::format(format_args!(
            "colo_checkpoint_{}_last_seconds",
            &name["colo_checkpoint_".len()..name.len() - "_seconds".len()]
        ));
        let help = crate::net::mgmt::format(format_args!("{what}, the last one."));
        family(o, &last, "gauge", &help);
        let _ = write!(o, "{last} ");
        seconds(o, sample.last);
        o.push('\n');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HypervisorStats {
        let mut s = HypervisorStats::new();
        let nic = s.nic_mut(0);
        nic.roles = "mgmt+client".into();
        nic.counters.rx_frames = 5;
        nic.link_up = true;
        s.nic_mut(1).roles = "repl".into();
        s.guest_mut("we\"ird\\name\n").state = GuestState::Running;
        s.guest_mut("we\"ird\\name\n").exits.record(&VmExit::Hlt);
        s
    }

    #[test]
    fn colo_families_are_rendered_for_a_replicating_host() {
        let mut s = sample();
        let mut c = crate::stats::ColoReport { role: "primary", link: "colo", epoch: 9, ..Default::default() };
        c.checkpoints_by_cause[4] = 2;
        c.pause_us = crate::stats::Sample { last: 1_500, total: 4_000_123, count: 3 };
        c.link_errors = crate::colo::link::LinkError::NAMES.map(|n| (n, 0));
        c.link_errors[0].1 = 3;
        s.colo = Some(c);
        let page = render(&s, "primary", 5);
        if let Ok(path) = std::env::var("COLO_METRICS_SAMPLE") {
            std::fs::write(path, &page).unwrap();
        }
        for line in [
            "colo_replication_link_state{role=\"primary\",state=\"colo\"} 1",
            "colo_replication_link_state{role=\"primary\",state=\"down\"} 0",
            "colo_replication_epoch 9",
            "colo_checkpoints_total{cause=\"manual\"} 2",
            "colo_checkpoint_pause_seconds_sum 4.000123",
            "colo_checkpoint_pause_seconds_count 3",
            "colo_checkpoint_pause_last_seconds 0.001500",
            "colo_verify_failures_total 0",
        ] {
            assert!(page.lines().any(|l| l == line), "no `{line}` in:\n{page}");
        }
        assert!(page.contains(&std::format!(
            "colo_link_errors_total{{error=\"{}\"}} 3",
            crate::colo::link::LinkError::NAMES[0]
        )));
        assert!(!render(&sample(), "standalone", 5).contains("colo_replication"));
    }

    #[test]
    fn page_has_help_and_type_for_every_family_and_escapes_labels() {
        let page = render(&sample(), "standalone", 12_345);
        assert!(page.contains("colo_uptime_seconds 12.345\n"));
        assert!(page.contains("colo_nic_rx_frames_total{nic=\"nic0\",roles=\"mgmt+client\"} 5\n"), "{page}");
        assert!(page.contains("colo_nic_link_up{nic=\"nic0\"} 1\n"));
        assert!(page.contains("colo_tunable_heartbeat_seconds 0.100\n"), "{page}");
        assert!(page.contains("guest=\"we\\\"ird\\\\name\\n\",kind=\"hlt\"} 1\n"), "{page}");
        // Every sample line belongs to a family announced by HELP and TYPE just before it.
        let mut current = "";
        for line in page.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap();
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                assert_eq!(name, current, "{line}");
            }
        }
        assert!(page.ends_with('\n'));
    }

    #[test]
    fn page_reports_heap_and_connection_counters() {
        let mut stats = sample();
        stats.heap = crate::stats::HeapUsage { size: 1000, used: 300, free: 700, high_water: 450, alloc_failures: 1 };
        stats.mgmt.json.evicted = 4;
        stats.mgmt.auth.unauthorized = 2;
        let page = render(&stats, "standalone", 1);
        for needle in [
            "colo_heap_used_bytes 300\n",
            "colo_heap_free_bytes 700\n",
            "colo_heap_high_water_bytes 450\n",
            "colo_heap_size_bytes 1000\n",
            "colo_heap_alloc_failures_total 1\n",
            "colo_mgmt_connections_total{server=\"json\",event=\"evicted\"} 4\n",
            "colo_mgmt_connections_total{server=\"http\",event=\"not_reading\"} 0\n",
            "colo_mgmt_auth_total{result=\"unauthorized\"} 2\n",
        ] {
            assert!(page.contains(needle), "missing {needle:?} in\n{page}");
        }
    }

    const H: &str = "Host: 10.0.0.1:9100\r\n";

    fn get(head: &str) -> Result<HttpRequest<'_>, HttpError> {
        parse_http_request(head.as_bytes())
    }

    #[test]
    fn requests_are_parsed_and_answered() {
        let req = parse_http_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(req, HttpRequest { method: "GET", target: "/metrics", path: "/metrics", authorization: None });
        let (resp, outcome) = respond(Ok(req), || "a 1\n".into());
        assert_eq!(outcome, Outcome::Served);
        assert!(
            resp.starts_with("HTTP/1.1 200 OK\r\n")
                && resp.contains("Content-Length: 4\r\n")
                && resp.ends_with("\r\n\r\na 1\n")
        );
        let (resp, _) = respond(parse_http_request(b"HEAD /metrics HTTP/1.0\n\n"), || "a 1\n".into());
        assert!(resp.ends_with("\r\n\r\n") && resp.contains("Content-Length: 4"));
        let (resp, outcome) = respond(get(&format!("GET /other HTTP/1.1\r\n{H}\r\n")), String::new);
        assert!(resp.starts_with("HTTP/1.1 404") && outcome == Outcome::Refused);
        let (resp, _) = respond(get(&format!("GET /metrics?x=1 HTTP/1.1\r\n{H}\r\n")), || "a 1\n".into());
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    }

    /// RFC 9110 §15.5.6: a 405 carries `Allow`; an unknown method is 501 (§15.6.2).
    #[test]
    fn method_not_allowed_says_what_is() {
        let (resp, _) = respond(get(&format!("POST /metrics HTTP/1.1\r\n{H}\r\n")), String::new);
        assert!(resp.starts_with("HTTP/1.1 405") && resp.contains("\r\nAllow: GET, HEAD\r\n"), "{resp}");
        let (resp, _) = respond(get(&format!("BREW /metrics HTTP/1.1\r\n{H}\r\n")), String::new);
        assert!(resp.starts_with("HTTP/1.1 501") && !resp.contains("Allow"), "{resp}");
        let (resp, _) = respond(get(&format!("OPTIONS * HTTP/1.1\r\n{H}\r\n")), String::new);
        assert!(resp.starts_with("HTTP/1.1 405"), "{resp}");
    }

    /// RFC 9112 §3.2: HTTP/1.1 needs exactly one valid Host; §3.2.2: absolute-form is accepted.
    #[test]
    fn host_and_target_forms_follow_rfc_9112() {
        assert_eq!(get("GET /metrics HTTP/1.1\r\n\r\n"), Err(HttpError::MissingHost));
        let (resp, _) = respond(get("GET /metrics HTTP/1.1\r\n\r\n"), String::new);
        assert!(resp.starts_with("HTTP/1.1 400") && resp.contains("without a Host header"), "{resp}");
        assert!(get("GET /metrics HTTP/1.0\r\n\r\n").is_ok(), "HTTP/1.0 needs no Host");
        assert!(matches!(get("GET /metrics HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"), Err(HttpError::BadHost { .. })));
        assert!(matches!(get("GET /metrics HTTP/1.1\r\nHost: a b\r\n\r\n"), Err(HttpError::BadHost { .. })));
        assert!(get("GET /metrics HTTP/1.1\r\nHost:\r\n\r\n").is_ok(), "an empty Host is allowed");
        assert!(get("GET /metrics HTTP/1.1\r\nhOsT: [::1]:9100\r\n\r\n").is_ok());
        let text = format!("GET http://10.0.0.1:9100/metrics?a=b HTTP/1.1\r\n{H}\r\n");
        let abs = get(&text).unwrap();
        assert_eq!(abs.path, "/metrics");
        let (resp, _) = respond(Ok(abs), || "a 1\n".into());
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert_eq!(get(&format!("GET HTTP://h HTTP/1.1\r\n{H}\r\n")).unwrap().path, "/");
        assert!(matches!(
            get(&format!("GET ftp://h/metrics HTTP/1.1\r\n{H}\r\n")),
            Err(HttpError::BadRequestLine { .. })
        ));
        // Empty lines before the request line are ignored (RFC 9112 §2.2).
        assert!(get(&format!("\r\n\r\nGET /metrics HTTP/1.1\r\n{H}\r\n")).is_ok());
    }

    #[test]
    fn header_syntax_is_checked() {
        for head in [
            "GET /metrics HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
        ] {
            let err = get(head).expect_err(head);
            assert!(matches!(err, HttpError::BadHeader { .. } | HttpError::BadHost { .. }), "{head:?}: {err}");
            let (resp, _) = respond(Err(err), String::new);
            assert!(resp.starts_with("HTTP/1.1 400"), "{head:?}");
        }
        let (resp, _) = respond(get("GET /metrics HTTP/2.0\r\n\r\n"), String::new);
        assert!(resp.starts_with("HTTP/1.1 505"), "{resp}");
        assert!(get(&format!("GET /metrics HTTP/1.9\r\n{H}\r\n")).is_ok(), "a higher 1.x minor is served as 1.1");
        let (resp, _) = respond(Err(HttpError::Timeout { deadline_ms: 5000 }), String::new);
        assert!(resp.starts_with("HTTP/1.1 408") && resp.contains("5000 ms"), "{resp}");
    }

    #[test]
    fn bad_heads_are_refused_by_name() {
        assert_eq!(parse_http_request(b"GET /metrics HTTP/1.1\r\n"), Err(HttpError::Incomplete));
        let err = parse_http_request(b"\x00\x01garbage\r\n\r\n").unwrap_err();
        assert!(matches!(err, HttpError::BadRequestLine { .. }));
        assert!(err.to_string().contains("expected `GET /metrics HTTP/1.1`"));
        let (resp, _) = respond(Err(err), String::new);
        assert!(resp.starts_with("HTTP/1.1 400"));
        let big = alloc::vec![b'a'; MAX_HEAD_BYTES + 1];
        assert_eq!(parse_http_request(&big), Err(HttpError::TooLarge { len: MAX_HEAD_BYTES + 1 }));
        assert!(parse_http_request(b"GET metrics HTTP/1.1\r\n\r\n").is_err());
        assert!(parse_http_request(b"GET /metrics HTTP/2\r\n\r\n").is_err());
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        assert_eq!(bearer_token("Bearer abc.def"), Some("abc.def"));
        assert_eq!(bearer_token("bearer   abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearerabc"), None);
        assert_eq!(bearer_token("Bearer "), None);
        assert_eq!(bearer_token("Bearer a b"), None);
        let text = format!("GET /metrics HTTP/1.1\r\n{H}authorization: Bearer xyz\r\n\r\n");
        let req = get(&text).unwrap();
        assert_eq!(req.authorization, Some("Bearer xyz"));
        let twice =
            format!("GET /metrics HTTP/1.1\r\n{H}Authorization: Bearer s3cr3t\r\nAuthorization: Bearer b\r\n\r\n");
        let err = get(&twice).unwrap_err();
        assert!(matches!(err, HttpError::BadHeader { .. }) && !err.to_string().contains("s3cr3t"), "{err}");
    }

    #[test]
    fn closed_metrics_need_the_bearer_token() {
        use crate::config::MgmtOpen;
        use crate::net::auth::MgmtToken;
        const TOKEN: &str = "metrics-token-0123456789";
        let peer = Ipv4Addr::new(10, 0, 0, 5);
        let mut gate = Gate::new(Some(MgmtToken::from_module(TOKEN.as_bytes()).unwrap()), MgmtOpen::None);
        let page = || String::from("colo_up 1\n");
        // No header: 401 with the challenge, no page.
        let head = format!("GET /metrics HTTP/1.1\r\n{H}\r\n");
        let (resp, outcome, check) = respond_checked(get(&head), &mut gate, peer, 0, page);
        assert!(resp.starts_with("HTTP/1.1 401 Unauthorized\r\n"), "{resp}");
        assert!(
            resp.contains("\r\nWWW-Authenticate: Bearer realm=\"colo\"\r\n") && !resp.contains("colo_up"),
            "{resp}"
        );
        assert_eq!((outcome, check), (Outcome::Refused, Some(Err(Denied::Unauthorized { presented: false }))));
        // A wrong token: 401 invalid_token.
        let head = format!("GET /metrics HTTP/1.1\r\n{H}Authorization: Bearer wrong-wrong-wrong\r\n\r\n");
        let (resp, _, _) = respond_checked(get(&head), &mut gate, peer, 1, page);
        assert!(resp.contains("error=\"invalid_token\"") && resp.starts_with("HTTP/1.1 401"), "{resp}");
        // The right one: the page.
        let good = format!("GET /metrics HTTP/1.1\r\n{H}Authorization: Bearer {TOKEN}\r\n\r\n");
        let (resp, outcome, check) = respond_checked(get(&good), &mut gate, peer, 2, page);
        assert!(resp.starts_with("HTTP/1.1 200") && resp.ends_with("colo_up 1\n"), "{resp}");
        assert_eq!((outcome, check), (Outcome::Served, Some(Ok(()))));
        // Other paths are closed too (no page list for strangers).
        let (resp, _, _) = respond_checked(get(&format!("GET /x HTTP/1.1\r\n{H}\r\n")), &mut gate, peer, 3, page);
        assert!(resp.starts_with("HTTP/1.1 401"), "{resp}");
        // Rate limited: 429 with Retry-After, even with the right token.
        for t in 4..8 {
            let _ = respond_checked(get(&head), &mut gate, peer, t, page);
        }
        let (resp, _, check) = respond_checked(get(&good), &mut gate, peer, 8, page);
        assert!(resp.starts_with("HTTP/1.1 429") && resp.contains("\r\nRetry-After: 1\r\n"), "{resp}");
        assert!(matches!(check, Some(Err(Denied::RateLimited { .. }))));
        // Open metrics (mgmt_open=read): no check at all.
        let mut open = Gate::new(None, MgmtOpen::Read);
        let (resp, _, check) =
            respond_checked(get(&format!("GET /metrics HTTP/1.1\r\n{H}\r\n")), &mut open, peer, 0, page);
        assert!(resp.starts_with("HTTP/1.1 200") && check.is_none(), "{resp}");
    }

    proptest::proptest! {
        /// Any bytes get a complete response with a status line and never panic.
        #[test]
        fn any_head_gets_a_response(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut head = bytes;
            head.extend_from_slice(b"\r\n\r\n");
            let (resp, _) = respond(parse_http_request(&head), String::new);
            proptest::prop_assert!(resp.starts_with("HTTP/1.1 "));
        }
    }
}
