//! Prometheus metrics: the text exposition format (version 0.0.4) over a minimal HTTP/1.1
//! server that answers `GET /metrics` (and `HEAD`), one request per connection.
//!
//! Pure logic: [`parse_http_request`] reads a request head, [`respond`] builds the whole response
//! and [`render`] the page; the transport (`net::stack`) moves the bytes.
#![deny(unsafe_code)]

use alloc::string::String;
use core::fmt::{self, Write};

use crate::stats::{GuestState, HypervisorStats};
use crate::vcpu::VmExit;

/// The longest request head accepted (request line and headers), in bytes.
pub const MAX_HEAD_BYTES: usize = 8192;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A request head that was understood.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest<'a> {
    /// `GET`, `HEAD`, ...
    pub method: &'a str,
    /// The request target, e.g. `/metrics`.
    pub target: &'a str,
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
        }
    }
}

/// Parses a request head from the bytes received so far.
pub fn parse_http_request(buf: &[u8]) -> Result<HttpRequest<'_>, HttpError> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n").or_else(|| buf.windows(2).position(|w| w == b"\n\n"));
    let Some(end) = end else {
        return Err(if buf.len() > MAX_HEAD_BYTES {
            HttpError::TooLarge { len: buf.len() }
        } else {
            HttpError::Incomplete
        });
    };
    if end > MAX_HEAD_BYTES {
        return Err(HttpError::TooLarge { len: end });
    }
    let line_end = buf.iter().position(|&b| b == b'\n').unwrap_or(end);
    let raw = &buf[..line_end];
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let bad = || HttpError::BadRequestLine { line: crate::net::mgmt::lossy(&raw[..raw.len().min(80)]) };
    let line = core::str::from_utf8(raw).map_err(|_| bad())?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let token = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase());
    if !token(method) || !target.starts_with('/') || !matches!(version, "HTTP/1.0" | "HTTP/1.1") {
        return Err(bad());
    }
    Ok(HttpRequest { method, target })
}

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
    let (status, body, outcome, head_only) = match request {
        Ok(HttpRequest { method, target }) => {
            let path = target.split('?').next().unwrap_or(target);
            match (method, path) {
                ("GET" | "HEAD", "/metrics") => ("200 OK", page(), Outcome::Served, method == "HEAD"),
                ("GET" | "HEAD", _) => (
                    "404 Not Found",
                    crate::net::mgmt::format(format_args!("no page `{path}`; expected /metrics\n")),
                    Outcome::Refused,
                    method == "HEAD",
                ),
                _ => (
                    "405 Method Not Allowed",
                    crate::net::mgmt::format(format_args!("method `{method}` not allowed; expected GET or HEAD\n")),
                    Outcome::Refused,
                    false,
                ),
            }
        }
        Err(err) => {
            let status = if matches!(err, HttpError::TooLarge { .. }) {
                "431 Request Header Fields Too Large"
            } else {
                "400 Bad Request"
            };
            (status, crate::net::mgmt::format(format_args!("{err}\n")), Outcome::Refused, false)
        }
    };
    let content_type = if outcome == Outcome::Served { CONTENT_TYPE } else { "text/plain; charset=utf-8" };
    let mut out = crate::net::mgmt::format(format_args!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
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
    let nic_counters: [(&str, &str, NicField); 8] = [
        ("colo_nic_rx_frames_total", "Frames received by the host NIC.", |c| c.rx_frames),
        ("colo_nic_rx_bytes_total", "Bytes received by the host NIC.", |c| c.rx_bytes),
        ("colo_nic_tx_frames_total", "Frames sent by the host NIC.", |c| c.tx_frames),
        ("colo_nic_tx_bytes_total", "Bytes sent by the host NIC.", |c| c.tx_bytes),
        ("colo_nic_rx_dropped_total", "Received frames nobody wanted.", |c| c.rx_dropped),
        ("colo_nic_rx_errors_total", "Received frames that were malformed or flagged by the NIC.", |c| c.rx_errors),
        ("colo_nic_tx_dropped_total", "Frames not sent because the transmit ring was full.", |c| c.tx_dropped),
        ("colo_nic_tx_errors_total", "Frames not sent because they were empty or too large.", |c| c.tx_errors),
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
    let t = &stats.tunables;
    for (name, help, ms) in [
        ("colo_tunable_heartbeat_seconds", "Heartbeat interval tunable.", t.heartbeat_ms),
        ("colo_tunable_checkpoint_seconds", "Periodic checkpoint interval tunable.", t.checkpoint_ms),
    ] {
        family(&mut o, name, "gauge", help);
        let _ = writeln!(o, "{name} {}.{:03}", ms / 1000, ms % 1000);
    }
    o
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
    fn requests_are_parsed_and_answered() {
        let req = parse_http_request(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        assert_eq!(req, HttpRequest { method: "GET", target: "/metrics" });
        let (resp, outcome) = respond(Ok(req), || "a 1\n".into());
        assert_eq!(outcome, Outcome::Served);
        assert!(
            resp.starts_with("HTTP/1.1 200 OK\r\n")
                && resp.contains("Content-Length: 4\r\n")
                && resp.ends_with("\r\n\r\na 1\n")
        );
        let (resp, _) = respond(parse_http_request(b"HEAD /metrics HTTP/1.0\n\n"), || "a 1\n".into());
        assert!(resp.ends_with("\r\n\r\n") && resp.contains("Content-Length: 4"));
        let (resp, outcome) = respond(parse_http_request(b"GET /other HTTP/1.1\r\n\r\n"), String::new);
        assert!(resp.starts_with("HTTP/1.1 404") && outcome == Outcome::Refused);
        let (resp, _) = respond(parse_http_request(b"POST /metrics HTTP/1.1\r\n\r\n"), String::new);
        assert!(resp.starts_with("HTTP/1.1 405"));
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
}
