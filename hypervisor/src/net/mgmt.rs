//! The management API: one JSON object per line over TCP, one JSON reply line per request.
//!
//! Requests: `{"cmd":"status"}`, `{"cmd":"stats"}`, `{"cmd":"tunables"}`,
//! `{"cmd":"set","key":"heartbeat_ms","value":50}`, `{"cmd":"checkpoint"}`, `{"cmd":"failover"}`,
//! `{"cmd":"shutdown"}`, `{"cmd":"auth","token":"..."}`. Mutating commands (`set`,
//! `checkpoint`, `failover`, `shutdown`) and `auth` need the management token, in a `"token"`
//! member of the request or by an earlier `auth` on the same connection; with `mgmt_open=none`
//! the read-only ones do too (see `net::auth`). Every reply has `"ok"`; an error reply has `"error"` (a short code) and
//! `"detail"` (a sentence naming the offending value and what was expected). Bad input never
//! panics: [`handle`] turns every byte string into a reply.
//!
//! Pure logic: the transport (`net::stack`) hands complete lines to [`handle`] and does what the
//! returned [`Action`] says.
#![deny(unsafe_code)]

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt::{self, Write};

use core::net::Ipv4Addr;

use super::auth::{Denied, Gate};
use crate::stats::{ColoReport, HeapUsage, HypervisorStats, NicEntry, Tunables};
use crate::vcpu::VmExit;

/// The longest request line accepted, in bytes (without the newline).
pub const MAX_REQUEST_BYTES: usize = 4096;
/// How deep JSON may nest.
const MAX_DEPTH: usize = 16;

/// Every command, as accepted in `"cmd"`.
pub const COMMANDS: &[&str] = &["status", "stats", "tunables", "set", "checkpoint", "failover", "shutdown", "auth"];

/// Commands that always need the management token.
pub const MUTATING: &[&str] = &["set", "checkpoint", "failover", "shutdown", "auth"];

/// A parsed JSON value. Numbers keep their text; the command that uses one parses it.
#[derive(Clone, Debug, PartialEq)]
pub enum Json {
    /// `null`.
    Null,
    /// `true` or `false`.
    Bool(bool),
    /// A number, as written.
    Number(String),
    /// A string, unescaped.
    Str(String),
    /// An array.
    Array(Vec<Json>),
    /// An object, members in order.
    Object(Vec<(String, Json)>),
}

impl Json {
    fn kind(&self) -> &'static str {
        match self {
            Self::Null => "null",
            Self::Bool(_) => "a boolean",
            Self::Number(_) => "a number",
            Self::Str(_) => "a string",
            Self::Array(_) => "an array",
            Self::Object(_) => "an object",
        }
    }

    fn field(&self, name: &str) -> Option<&Json> {
        match self {
            Self::Object(members) => members.iter().find(|(k, _)| k == name).map(|(_, v)| v),
            _ => None,
        }
    }
}

/// Why a byte string is not JSON.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonError {
    /// Byte offset of the problem.
    pub at: usize,
    /// What the parser expected there.
    pub expected: &'static str,
    /// What it found (a character, or `end of input`).
    pub found: String,
}

impl fmt::Display for JsonError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "expected {} at byte {}, found {}", self.expected, self.at, self.found)
    }
}

struct Parser<'a> {
    bytes: &'a [u8],
    pos: usize,
    depth: usize,
}

impl Parser<'_> {
    fn error(&self, expected: &'static str) -> JsonError {
        let found = match self.bytes.get(self.pos) {
            None => "end of input".to_string(),
            Some(&b) if b.is_ascii_graphic() => crate::net::mgmt::format(format_args!("`{}`", b as char)),
            Some(&b) => crate::net::mgmt::format(format_args!("byte {b:#04x}")),
        };
        JsonError { at: self.pos, expected, found }
    }

    fn skip_ws(&mut self) {
        while matches!(self.bytes.get(self.pos), Some(b' ' | b'\t' | b'\r' | b'\n')) {
            self.pos += 1;
        }
    }

    fn eat(&mut self, byte: u8, expected: &'static str) -> Result<(), JsonError> {
        self.skip_ws();
        if self.bytes.get(self.pos) == Some(&byte) {
            self.pos += 1;
            Ok(())
        } else {
            Err(self.error(expected))
        }
    }

    fn value(&mut self) -> Result<Json, JsonError> {
        self.skip_ws();
        match self.bytes.get(self.pos) {
            Some(b'{') => self.nested(Self::object),
            Some(b'[') => self.nested(Self::array),
            Some(b'"') => self.string().map(Json::Str),
            Some(b't') => self.literal("true", Json::Bool(true)),
            Some(b'f') => self.literal("false", Json::Bool(false)),
            Some(b'n') => self.literal("null", Json::Null),
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(self.error("a JSON value")),
        }
    }

    fn nested(&mut self, f: fn(&mut Self) -> Result<Json, JsonError>) -> Result<Json, JsonError> {
        if self.depth >= MAX_DEPTH {
            return Err(self.error("at most 16 levels of nesting"));
        }
        self.depth += 1;
        let value = f(self);
        self.depth -= 1;
        value
    }

    fn literal(&mut self, word: &'static str, value: Json) -> Result<Json, JsonError> {
        if self.bytes[self.pos..].starts_with(word.as_bytes()) {
            self.pos += word.len();
            Ok(value)
        } else {
            Err(self.error("true, false or null"))
        }
    }

    fn number(&mut self) -> Result<Json, JsonError> {
        let start = self.pos;
        if self.bytes.get(self.pos) == Some(&b'-') {
            self.pos += 1;
        }
        let digits = |p: &mut Self| {
            let s = p.pos;
            while p.bytes.get(p.pos).is_some_and(u8::is_ascii_digit) {
                p.pos += 1;
            }
            p.pos > s
        };
        // RFC 8259 §6: int = zero / ( digit1-9 *DIGIT ): no leading zeros.
        if self.bytes.get(self.pos) == Some(&b'0') {
            self.pos += 1;
            if self.bytes.get(self.pos).is_some_and(u8::is_ascii_digit) {
                return Err(self.error("no leading zeros (`.`, `e`, or the end of the number after `0`)"));
            }
        } else if !digits(self) {
            return Err(self.error("a digit"));
        }
        if self.bytes.get(self.pos) == Some(&b'.') {
            self.pos += 1;
            if !digits(self) {
                return Err(self.error("a digit after `.`"));
            }
        }
        if matches!(self.bytes.get(self.pos), Some(b'e' | b'E')) {
            self.pos += 1;
            if matches!(self.bytes.get(self.pos), Some(b'+' | b'-')) {
                self.pos += 1;
            }
            if !digits(self) {
                return Err(self.error("a digit in the exponent"));
            }
        }
        // The slice is ASCII digits and signs only.
        Ok(Json::Number(crate::net::mgmt::lossy(&self.bytes[start..self.pos])))
    }

    fn string(&mut self) -> Result<String, JsonError> {
        self.eat(b'"', "`\"`")?;
        let mut out = Vec::new();
        loop {
            match self.bytes.get(self.pos) {
                None => return Err(self.error("a closing `\"`")),
                Some(b'"') => {
                    self.pos += 1;
                    break;
                }
                Some(b'\\') => {
                    self.pos += 1;
                    let escaped = match self.bytes.get(self.pos) {
                        Some(b'"') => '"',
                        Some(b'\\') => '\\',
                        Some(b'/') => '/',
                        Some(b'b') => '\u{8}',
                        Some(b'f') => '\u{c}',
                        Some(b'n') => '\n',
                        Some(b'r') => '\r',
                        Some(b't') => '\t',
                        Some(b'u') => {
                            self.pos += 1;
                            let code = self.hex4()?;
                            match code {
                                // A high surrogate must be followed by `\u` and a low one
                                // (RFC 8259 §7); together they are one character.
                                0xD800..=0xDBFF => {
                                    if self.bytes.get(self.pos..self.pos + 2) != Some(b"\\u") {
                                        return Err(
                                            self.error("`\\u` and a low surrogate (DC00-DFFF) after a high surrogate")
                                        );
                                    }
                                    self.pos += 2;
                                    let at = self.pos;
                                    let low = self.hex4()?;
                                    if !(0xDC00..=0xDFFF).contains(&low) {
                                        self.pos = at;
                                        return Err(self.error("a low surrogate (DC00-DFFF) after a high surrogate"));
                                    }
                                    let c = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00);
                                    self.pos -= 1;
                                    char::from_u32(c).ok_or_else(|| self.error("a valid surrogate pair"))?
                                }
                                0xDC00..=0xDFFF => {
                                    self.pos -= 4;
                                    return Err(self.error("a high surrogate (D800-DBFF) before a low surrogate"));
                                }
                                _ => {
                                    self.pos -= 1;
                                    // Not a surrogate, so a valid scalar value.
                                    char::from_u32(code).ok_or_else(|| self.error("a Unicode scalar value"))?
                                }
                            }
                        }
                        _ => return Err(self.error("an escape (\\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX)")),
                    };
                    self.pos += 1;
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(escaped.encode_utf8(&mut buf).as_bytes());
                }
                Some(&b) if b < 0x20 => return Err(self.error("no control characters inside a string")),
                Some(&b) => {
                    out.push(b);
                    self.pos += 1;
                }
            }
        }
        String::from_utf8(out).map_err(|_| self.error("UTF-8 text"))
    }

    /// Exactly four hex digits (no sign, no spaces) as a code unit; `pos` ends after them.
    fn hex4(&mut self) -> Result<u32, JsonError> {
        let mut code = 0;
        for _ in 0..4 {
            let digit = self.bytes.get(self.pos).and_then(|&b| (b as char).to_digit(16));
            let Some(digit) = digit else {
                return Err(self.error("4 hex digits after `\\u`"));
            };
            code = code * 16 + digit;
            self.pos += 1;
        }
        Ok(code)
    }

    fn array(&mut self) -> Result<Json, JsonError> {
        self.eat(b'[', "`[`")?;
        let mut items = Vec::new();
        self.skip_ws();
        if self.bytes.get(self.pos) == Some(&b']') {
            self.pos += 1;
            return Ok(Json::Array(items));
        }
        loop {
            items.push(self.value()?);
            self.skip_ws();
            match self.bytes.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b']') => {
                    self.pos += 1;
                    return Ok(Json::Array(items));
                }
                _ => return Err(self.error("`,` or `]`")),
            }
        }
    }

    fn object(&mut self) -> Result<Json, JsonError> {
        self.eat(b'{', "`{`")?;
        let mut members = Vec::new();
        self.skip_ws();
        if self.bytes.get(self.pos) == Some(&b'}') {
            self.pos += 1;
            return Ok(Json::Object(members));
        }
        loop {
            self.skip_ws();
            if self.bytes.get(self.pos) != Some(&b'"') {
                return Err(self.error("a member name in quotes"));
            }
            let at = self.pos;
            let key = self.string()?;
            if members.iter().any(|(k, _)| *k == key) {
                // RFC 8259 §4 leaves duplicate names to the implementation; I-JSON (RFC 7493
                // §2.3) forbids them, and so does this API (`{"cmd":"status","cmd":"shutdown"}`
                // must not mean either).
                self.pos = at;
                return Err(self.error("a member name not used before in this object"));
            }
            self.eat(b':', "`:`")?;
            let value = self.value()?;
            members.push((key, value));
            self.skip_ws();
            match self.bytes.get(self.pos) {
                Some(b',') => self.pos += 1,
                Some(b'}') => {
                    self.pos += 1;
                    return Ok(Json::Object(members));
                }
                _ => return Err(self.error("`,` or `}`")),
            }
        }
    }
}

/// Parses one complete JSON text (trailing whitespace allowed, nothing else).
pub fn parse_json(bytes: &[u8]) -> Result<Json, JsonError> {
    let mut p = Parser { bytes, pos: 0, depth: 0 };
    let value = p.value()?;
    p.skip_ws();
    if p.pos != bytes.len() {
        return Err(p.error("end of input after the JSON value"));
    }
    Ok(value)
}

/// A tunable the `set` command can change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tunable {
    /// `heartbeat_ms`.
    HeartbeatMs,
    /// `checkpoint_ms`.
    CheckpointMs,
}

impl Tunable {
    /// Every tunable with its name and accepted range.
    pub const ALL: [(Tunable, &'static str, u32, u32); 2] =
        [(Self::HeartbeatMs, "heartbeat_ms", 10, 10_000), (Self::CheckpointMs, "checkpoint_ms", 10, 600_000)];

    fn spec(self) -> (&'static str, u32, u32) {
        let (_, name, min, max) = Self::ALL.iter().copied().find(|t| t.0 == self).unwrap_or(Self::ALL[0]);
        (name, min, max)
    }

    fn get(self, t: &Tunables) -> u32 {
        match self {
            Self::HeartbeatMs => t.heartbeat_ms,
            Self::CheckpointMs => t.checkpoint_ms,
        }
    }

    fn set(self, t: &mut Tunables, value: u32) {
        match self {
            Self::HeartbeatMs => t.heartbeat_ms = value,
            Self::CheckpointMs => t.checkpoint_ms = value,
        }
    }
}

/// A valid request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// Role, uptime, NIC and guest summary.
    Status,
    /// Every counter.
    Stats,
    /// The tunables and their ranges.
    Tunables,
    /// Change one tunable.
    Set {
        /// Which.
        tunable: Tunable,
        /// The new value (already range-checked).
        value: u32,
    },
    /// Take a checkpoint now.
    Checkpoint,
    /// Promote this host now.
    Failover,
    /// End the hypervisor with the success status.
    Shutdown,
    /// Mark this connection as holding the token.
    Auth,
}

/// Why a request was refused. Every message names the value and what was expected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// The line is longer than [`MAX_REQUEST_BYTES`].
    TooLarge {
        /// Bytes received so far.
        len: usize,
    },
    /// The line did not arrive whole within the request deadline.
    Timeout {
        /// The deadline, ms.
        deadline_ms: u64,
    },
    /// The line is not JSON.
    BadJson(JsonError),
    /// The JSON is not an object.
    NotAnObject {
        /// What it was.
        found: &'static str,
    },
    /// A required member is missing.
    MissingField {
        /// The member.
        field: &'static str,
        /// What it should hold.
        expected: &'static str,
    },
    /// A member has the wrong type.
    WrongType {
        /// The member.
        field: &'static str,
        /// What it should hold.
        expected: &'static str,
        /// What it holds.
        found: &'static str,
    },
    /// `cmd` names no command.
    UnknownCommand {
        /// The command as sent.
        cmd: String,
    },
    /// `set` names no tunable.
    UnknownTunable {
        /// The key as sent.
        key: String,
    },
    /// `set` value out of range or not an integer.
    BadValue {
        /// The tunable.
        key: &'static str,
        /// The value as sent.
        value: String,
        /// Accepted range, low end.
        min: u32,
        /// Accepted range, high end.
        max: u32,
    },
    /// The request needs the management token and did not pass the check.
    Denied(Denied),
}

impl RequestError {
    /// The short code sent in `"error"`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::Timeout { .. } => "request_timeout",
            Self::BadJson(_) => "bad_json",
            Self::NotAnObject { .. } | Self::MissingField { .. } | Self::WrongType { .. } => "bad_request",
            Self::UnknownCommand { .. } => "unknown_command",
            Self::UnknownTunable { .. } => "unknown_tunable",
            Self::BadValue { .. } => "bad_value",
            Self::Denied(d) => d.code(),
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge { len } => {
                write!(f, "request of {len} bytes is too large; expected at most {MAX_REQUEST_BYTES} bytes per line")
            }
            Self::Timeout { deadline_ms } => write!(
                f,
                "request not received whole within {deadline_ms} ms of its first byte; expected a line ending in a newline"
            ),
            Self::BadJson(e) => write!(f, "request is not JSON: {e}"),
            Self::NotAnObject { found } => {
                write!(f, "request is {found}; expected an object like {{\"cmd\":\"status\"}}")
            }
            Self::MissingField { field, expected } => write!(f, "request has no `{field}`; expected {expected}"),
            Self::WrongType { field, expected, found } => write!(f, "`{field}` is {found}; expected {expected}"),
            Self::UnknownCommand { cmd } => write!(f, "unknown command `{cmd}`; accepted: {}", COMMANDS.join(", ")),
            Self::UnknownTunable { key } => {
                write!(f, "unknown tunable `{key}`; accepted:")?;
                for (_, name, _, _) in Tunable::ALL {
                    write!(f, " {name}")?;
                }
                Ok(())
            }
            Self::BadValue { key, value, min, max } => {
                write!(f, "bad value `{value}` for `{key}`; expected an integer from {min} to {max}")
            }
            Self::Denied(d) => write!(f, "{d}"),
        }
    }
}

const CMD_FORM: &str = "a command name string (status, stats, tunables, set, checkpoint, failover, shutdown, auth)";
const TOKEN_FORM: &str = "the management token as a string";

/// Parses one request line (without checking any token).
pub fn parse_request(line: &[u8]) -> Result<Request, RequestError> {
    let (json, cmd) = parse_command(line)?;
    parse_args(&json, &cmd)
}

/// The request's JSON and its (known) command name; arguments are not looked at yet.
fn parse_command(line: &[u8]) -> Result<(Json, String), RequestError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLarge { len: line.len() });
    }
    let json = parse_json(line).map_err(RequestError::BadJson)?;
    if !matches!(json, Json::Object(_)) {
        return Err(RequestError::NotAnObject { found: json.kind() });
    }
    let cmd = match json.field("cmd") {
        None => return Err(RequestError::MissingField { field: "cmd", expected: CMD_FORM }),
        Some(Json::Str(cmd)) => cmd,
        Some(other) => return Err(RequestError::WrongType { field: "cmd", expected: CMD_FORM, found: other.kind() }),
    };
    if !COMMANDS.contains(&cmd.as_str()) {
        return Err(RequestError::UnknownCommand { cmd: truncate(cmd, 64) });
    }
    let cmd = cmd.clone();
    Ok((json, cmd))
}

/// The `"token"` member, if any (a string).
fn token_of(json: &Json) -> Result<Option<&str>, RequestError> {
    match json.field("token") {
        None => Ok(None),
        Some(Json::Str(token)) => Ok(Some(token)),
        Some(other) => Err(RequestError::WrongType { field: "token", expected: TOKEN_FORM, found: other.kind() }),
    }
}

/// The request's arguments, once the command is allowed.
fn parse_args(json: &Json, cmd: &str) -> Result<Request, RequestError> {
    Ok(match cmd {
        "status" => Request::Status,
        "stats" => Request::Stats,
        "tunables" => Request::Tunables,
        "checkpoint" => Request::Checkpoint,
        "failover" => Request::Failover,
        "shutdown" => Request::Shutdown,
        "auth" => Request::Auth,
        "set" => parse_set(json)?,
        other => return Err(RequestError::UnknownCommand { cmd: truncate(other, 64) }),
    })
}

fn parse_set(json: &Json) -> Result<Request, RequestError> {
    const KEY_FORM: &str = "a tunable name string (heartbeat_ms, checkpoint_ms)";
    const VALUE_FORM: &str = "an integer";
    let key = match json.field("key") {
        None => return Err(RequestError::MissingField { field: "key", expected: KEY_FORM }),
        Some(Json::Str(key)) => key,
        Some(other) => return Err(RequestError::WrongType { field: "key", expected: KEY_FORM, found: other.kind() }),
    };
    let (tunable, name, min, max) = Tunable::ALL
        .iter()
        .copied()
        .find(|t| t.1 == key)
        .ok_or_else(|| RequestError::UnknownTunable { key: truncate(key, 64) })?;
    let text = match json.field("value") {
        None => return Err(RequestError::MissingField { field: "value", expected: VALUE_FORM }),
        Some(Json::Number(n)) => n.clone(),
        Some(Json::Str(s)) => s.clone(),
        Some(other) => {
            return Err(RequestError::WrongType { field: "value", expected: VALUE_FORM, found: other.kind() })
        }
    };
    let value = text.parse::<u32>().ok().filter(|v| (min..=max).contains(v)).ok_or(RequestError::BadValue {
        key: name,
        value: truncate(&text, 64),
        min,
        max,
    })?;
    Ok(Request::Set { tunable, value })
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => crate::net::mgmt::format(format_args!("{}...", &s[..i])),
        None => s.into(),
    }
}

/// What the transport must do after sending a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Keep serving.
    Continue,
    /// Close this connection (after an oversized request).
    Close,
    /// Flush the reply, then end the hypervisor with the success status.
    Shutdown,
}

/// A reply line (JSON, no newline) and what to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    /// The JSON text.
    pub text: String,
    /// What next.
    pub action: Action,
}

/// What a request can see besides the registry.
#[derive(Debug)]
pub struct Context<'a> {
    /// `primary`, `secondary` or `standalone`.
    pub role: &'static str,
    /// Milliseconds since the hypervisor started.
    pub uptime_ms: u64,
    /// Whether COLO replication is running (checkpoint and failover need it).
    pub replication_running: bool,
    /// The registry (requests counted here; `set` changes its tunables).
    pub stats: &'a mut HypervisorStats,
    /// Who asks, and the token check.
    pub access: Access<'a>,
}

/// The token check for one request: the host's gate, the peer's address, and whether its
/// connection passed `auth` earlier.
#[derive(Debug)]
pub struct Access<'a> {
    /// The host's token and rate limiter.
    pub gate: &'a mut Gate,
    /// The peer's IPv4 address (the rate limiter's key).
    pub peer: Ipv4Addr,
    /// Whether this connection passed `auth` (set by a successful `auth`, cleared by a failed one).
    pub authenticated: &'a mut bool,
}

/// Answers one request line. Never panics, whatever the bytes.
pub fn handle(line: &[u8], ctx: &mut Context<'_>) -> Reply {
    ctx.stats.mgmt.requests += 1;
    let request = parse_command(line).and_then(|(json, cmd)| {
        let token = token_of(&json)?;
        if MUTATING.contains(&cmd.as_str()) || ctx.access.gate.reads_need_token() {
            let auth = cmd == "auth";
            if auth {
                // A failed `auth` leaves the connection unauthenticated.
                *ctx.access.authenticated = false;
            }
            let check = ctx.access.gate.check(
                ctx.access.peer,
                ctx.uptime_ms,
                token.map(str::as_bytes),
                *ctx.access.authenticated,
            );
            ctx.stats.mgmt.auth.record(&check);
            check.map_err(RequestError::Denied)?;
        }
        parse_args(&json, &cmd)
    });
    match request {
        Ok(request) => answer(request, ctx),
        Err(err) => {
            ctx.stats.mgmt.request_errors += 1;
            let action = if matches!(err, RequestError::TooLarge { .. }) { Action::Close } else { Action::Continue };
            Reply { text: error_reply(&err), action }
        }
    }
}

/// The reply to a request the transport refused before parsing (for instance a line that grew
/// past [`MAX_REQUEST_BYTES`] without a newline).
pub fn error_reply(err: &RequestError) -> String {
    let mut o = Obj::new();
    o.bool("ok", false).str("error", err.code()).str("detail", &err.to_string());
    if let RequestError::Denied(Denied::RateLimited { retry_after_ms }) = err {
        o.num("retry_after_ms", *retry_after_ms);
    }
    o.finish()
}

fn answer(request: Request, ctx: &mut Context<'_>) -> Reply {
    let mut o = Obj::new();
    let mut action = Action::Continue;
    match request {
        Request::Status => {
            o.bool("ok", true).str("cmd", "status").str("version", env!("CARGO_PKG_VERSION"));
            o.str("role", ctx.role).num("uptime_ms", ctx.uptime_ms);
            o.str("replication", if replication_running(ctx) { "running" } else { "not running" });
            match ctx.stats.repl_auth {
                Some(true) => {
                    o.str("repl_auth", "on");
                }
                Some(false) => {
                    o.str("repl_auth", "off");
                    o.str(
                        "repl_auth_warning",
                        "the replication link is neither authenticated nor encrypted (repl_auth=off): benchmarks only",
                    );
                }
                None => {}
            }
            o.raw("nics", &nics_json(&ctx.stats.nics));
            if let Some(c) = &ctx.stats.colo {
                o.raw("colo", &colo_json(c));
            }
            let mut guests = Arr::new();
            for g in &ctx.stats.guests {
                let mut e = Obj::new();
                e.str("name", &g.name).str("state", g.state.name()).num("exits", g.exits.total());
                guests.raw(&e.finish());
            }
            o.raw("guests", &guests.finish());
            o.raw("heap", &heap_json(&ctx.stats.heap));
            if let Some(f) = &ctx.stats.failover {
                o.raw("failover", &failover_json(f));
            }
            let mut access = Obj::new();
            access.bool("token_configured", ctx.access.gate.has_token());
            access.str("open", if ctx.access.gate.reads_need_token() { "none" } else { "read" });
            o.raw("access", &access.finish());
        }
        Request::Stats => {
            o.bool("ok", true).str("cmd", "stats").num("uptime_ms", ctx.uptime_ms);
            o.raw("nics", &nics_json(&ctx.stats.nics));
            let mut guests = Arr::new();
            for g in &ctx.stats.guests {
                let mut exits = Obj::new();
                exits.num("total", g.exits.total());
                for name in VmExit::KIND_NAMES {
                    exits.num(name, g.exits.get(name));
                }
                let mut e = Obj::new();
                e.str("name", &g.name).str("state", g.state.name()).raw("exits", &exits.finish());
                guests.raw(&e.finish());
            }
            o.raw("guests", &guests.finish());
            let m = &ctx.stats.mgmt;
            let mut mgmt = Obj::new();
            mgmt.num("requests", m.requests).num("request_errors", m.request_errors);
            mgmt.num("scrapes", m.scrapes).num("http_errors", m.http_errors);
            for (server, counters) in [("json", &m.json), ("http", &m.http)] {
                let mut c = Obj::new();
                for (name, value) in counters.named() {
                    c.num(name, value);
                }
                mgmt.raw(server, &c.finish());
            }
            let mut auth = Obj::new();
            for (name, value) in m.auth.named() {
                auth.num(name, value);
            }
            mgmt.raw("auth", &auth.finish());
            o.raw("mgmt", &mgmt.finish());
            o.raw("heap", &heap_json(&ctx.stats.heap));
            if let Some(c) = &ctx.stats.colo {
                o.raw("colo", &colo_json(c));
            }
        }
        Request::Tunables => {
            o.bool("ok", true).str("cmd", "tunables").raw("tunables", &tunables_json(&ctx.stats.tunables));
            let mut ranges = Obj::new();
            for (_, name, min, max) in Tunable::ALL {
                ranges.raw(name, &crate::net::mgmt::format(format_args!("[{min},{max}]")));
            }
            o.raw("ranges", &ranges.finish());
        }
        Request::Set { tunable, value } => {
            let old = tunable.get(&ctx.stats.tunables);
            tunable.set(&mut ctx.stats.tunables, value);
            o.bool("ok", true).str("cmd", "set").str("key", tunable.spec().0);
            o.num("old", u64::from(old)).num("value", u64::from(value));
        }
        Request::Checkpoint if replication_running(ctx) && ctx.role == "primary" => {
            // The driver takes the request at its next publication and feeds the engine
            // `NodeCommand::Checkpoint`; `colo.checkpoints_by_cause.manual` counts it.
            ctx.stats.colo_checkpoint_requests += 1;
            let epoch = ctx.stats.colo.as_ref().map_or(0, |c| c.epoch);
            o.bool("ok", true).str("cmd", "checkpoint").bool("accepted", true).num("epoch", epoch);
            o.str("detail", "a checkpoint of the running epoch starts at the driver's next turn");
        }
        Request::Checkpoint if replication_running(ctx) => {
            o.bool("ok", false).str("cmd", "checkpoint").bool("accepted", false).str("error", "not_available");
            let detail = crate::net::mgmt::format(format_args!(
                "checkpoints are taken by the primary (this host is role={}); send checkpoint to the primary",
                ctx.role
            ));
            o.str("detail", &detail);
        }
        Request::Failover if ctx.stats.failover.is_some() => {
            ctx.stats.failover_requested = true;
            o.bool("ok", true).str("cmd", "failover").bool("accepted", true);
            o.str("detail", "handed to the node (with a witness: claimed first; witness=none: the operator vouches the peer is gone)");
        }
        Request::Checkpoint | Request::Failover => {
            let cmd = if request == Request::Checkpoint { "checkpoint" } else { "failover" };
            o.bool("ok", false).str("cmd", cmd).bool("accepted", true).str("error", "not_available");
            let detail = crate::net::mgmt::format(format_args!(
                "{cmd} is not available until replication is running (role={}, replication not running)",
                ctx.role
            ));
            o.str("detail", &detail);
        }
        Request::Shutdown => {
            o.bool("ok", true).str("cmd", "shutdown").str("detail", "the hypervisor is shutting down");
            action = Action::Shutdown;
        }
        Request::Auth => {
            *ctx.access.authenticated = true;
            o.bool("ok", true).str("cmd", "auth").bool("authenticated", true);
        }
    }
    Reply { text: o.finish(), action }
}

/// Whether COLO runs: the transport says so, or the driver published a link in COLO.
fn replication_running(ctx: &Context<'_>) -> bool {
    ctx.replication_running || ctx.stats.colo.as_ref().is_some_and(|c| c.link == "colo")
}

/// The `colo` object of `status` and `stats` (µs durations: last and mean).
fn colo_json(c: &ColoReport) -> String {
    let mut o = Obj::new();
    o.str("role", c.role).str("link", c.link).num("epoch", c.epoch).num("committed", c.committed);
    let mut causes = Obj::new();
    for (name, n) in ColoReport::CAUSES.iter().zip(c.checkpoints_by_cause) {
        causes.num(name, n);
    }
    o.raw("checkpoints_by_cause", &causes.finish());
    o.num("checkpoints_committed", c.checkpoints_committed).num("checkpoints_aborted", c.checkpoints_aborted);
    o.num("full_syncs", c.full_syncs);
    for (name, sample) in [("pause_us", c.pause_us), ("transfer_us", c.transfer_us), ("apply_us", c.apply_us)] {
        let mut d = Obj::new();
        d.num("last", sample.last).num("mean", sample.mean()).num("count", sample.count);
        o.raw(name, &d.finish());
    }
    o.num("pages_last", c.pages_last).num("pages_total", c.pages_total);
    o.num("bytes_last", c.bytes_last).num("bytes_total", c.bytes_total);
    o.num("compared_bytes", c.compared_bytes).num("matched_bytes", c.matched_bytes);
    o.num("released_bytes", c.released_bytes).num("released_frames", c.released_frames);
    o.num("released_by_checkpoint", c.released_by_checkpoint).num("held_frames", c.held_frames);
    o.num("mirrored_frames", c.mirrored_frames).num("input_dropped", c.input_dropped);
    o.num("svm_frames", c.svm_frames).num("svm_frames_dropped", c.svm_frames_dropped);
    let mut errors = Obj::new();
    for (name, n) in c.link_errors {
        errors.num(name, n);
    }
    o.raw("link_errors", &errors.finish());
    o.num("protocol_errors", c.protocol_errors).num("verify_failures", c.verify_failures);
    o.num("link_connects", c.link_connects).num("link_closes", c.link_closes);
    let (svm, client, unknown) = c.seq_rewritten;
    let mut rw = Obj::new();
    rw.num("svm_frames", svm).num("client_frames", client).num("unknown_offset", unknown);
    o.raw("seq_rewritten", &rw.finish());
    if let Some((epoch, d)) = c.digest {
        let text = crate::net::mgmt::format(format_args!("{epoch}:{:08x}-{:08x}", d >> 32, d as u32));
        o.str("digest", &text);
    }
    o.finish()
}

/// The `failover` object of `status` and `stats`.
fn failover_json(f: &crate::stats::FailoverInfo) -> String {
    let mut o = Obj::new();
    o.num("generation", f.generation).str("role", &f.role).bool("protected", f.protected).str("peer", f.peer);
    let mut w = Obj::new();
    w.str("witness", &f.witness);
    match f.last_claim {
        Some(g) => w.num("last_claim", g),
        None => w.raw("last_claim", "null"),
    };
    w.str("last_result", f.last_result.unwrap_or("none")).num("last_latency_ms", f.last_latency_ms);
    match f.pending {
        Some(g) => w.num("pending", g),
        None => w.raw("pending", "null"),
    };
    w.num("claims", f.claims[0]).num("granted", f.claims[1]).num("denied", f.claims[2]).num("failed", f.claims[3]);
    o.raw("witness", &w.finish());
    o.num("failovers", f.failovers);
    match f.last_promotion_ms {
        Some(t) => o.num("last_promotion_ms", t),
        None => o.raw("last_promotion_ms", "null"),
    };
    match f.stall_ms {
        Some(t) => o.num("stall_ms", t),
        None => o.raw("stall_ms", "null"),
    };
    match &f.fenced {
        Some(why) => o.bool("fenced", true).str("fenced_reason", why),
        None => o.bool("fenced", false),
    };
    o.finish()
}

fn heap_json(h: &HeapUsage) -> String {
    let mut o = Obj::new();
    o.num("size", h.size).num("used", h.used).num("free", h.free);
    o.num("high_water", h.high_water).num("alloc_failures", h.alloc_failures);
    o.finish()
}

fn tunables_json(t: &Tunables) -> String {
    let mut o = Obj::new();
    for (tunable, name, _, _) in Tunable::ALL {
        o.num(name, u64::from(tunable.get(t)));
    }
    o.finish()
}

fn nics_json(nics: &[NicEntry]) -> String {
    let mut arr = Arr::new();
    for n in nics {
        let c = &n.counters;
        let mut e = Obj::new();
        e.str("name", &n.name).str("roles", &n.roles).str("mac", &mac_string(n.mac)).bool("link_up", n.link_up);
        e.num("rx_frames", c.rx_frames).num("rx_bytes", c.rx_bytes);
        e.num("tx_frames", c.tx_frames).num("tx_bytes", c.tx_bytes);
        e.num("rx_dropped", c.rx_dropped).num("rx_errors", c.rx_errors);
        e.num("tx_dropped", c.tx_dropped).num("tx_errors", c.tx_errors).num("tx_fenced", c.tx_fenced);
        arr.raw(&e.finish());
    }
    arr.finish()
}

/// `format!` without `alloc::fmt::format`: the precompiled `alloc` builds that one with unwind
/// landing pads, which a freestanding kernel cannot link (`_Unwind_Resume`).
pub fn format(args: fmt::Arguments<'_>) -> String {
    let mut s = String::new();
    let _ = s.write_fmt(args);
    s
}

/// `String::from_utf8_lossy` for the same reason: invalid bytes become U+FFFD, one per byte.
pub fn lossy(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len());
    let mut rest = bytes;
    while !rest.is_empty() {
        match core::str::from_utf8(rest) {
            Ok(text) => {
                s.push_str(text);
                break;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                // `valid` bytes were just checked.
                s.push_str(core::str::from_utf8(&rest[..valid]).unwrap_or(""));
                s.push('\u{fffd}');
                rest = &rest[valid + 1..];
            }
        }
    }
    s
}

/// `52:54:00:12:34:56`.
pub fn mac_string(mac: [u8; 6]) -> String {
    let mut s = String::new();
    for (i, b) in mac.iter().enumerate() {
        let _ = write!(s, "{}{b:02x}", if i > 0 { ":" } else { "" });
    }
    s
}

/// Writes `s` as a JSON string literal.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A JSON object under construction.
struct Obj(String);

impl Obj {
    fn new() -> Self {
        Self(String::from("{"))
    }
    fn key(&mut self, key: &str) -> &mut Self {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        push_json_str(&mut self.0, key);
        self.0.push(':');
        self
    }
    fn str(&mut self, key: &str, value: &str) -> &mut Self {
        self.key(key);
        push_json_str(&mut self.0, value);
        self
    }
    fn num(&mut self, key: &str, value: u64) -> &mut Self {
        self.key(key);
        let _ = write!(self.0, "{value}");
        self
    }
    fn bool(&mut self, key: &str, value: bool) -> &mut Self {
        self.key(key);
        self.0.push_str(if value { "true" } else { "false" });
        self
    }
    fn raw(&mut self, key: &str, json: &str) -> &mut Self {
        self.key(key);
        self.0.push_str(json);
        self
    }
    fn finish(&mut self) -> String {
        self.0.push('}');
        core::mem::take(&mut self.0)
    }
}

/// A JSON array under construction.
struct Arr(String);

impl Arr {
    fn new() -> Self {
        Self(String::from("["))
    }
    fn raw(&mut self, json: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        self.0.push_str(json);
    }
    fn finish(&mut self) -> String {
        self.0.push(']');
        core::mem::take(&mut self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::GuestState;

    const TOKEN: &str = "test-token-0123456789abcdef";
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 9);

    fn gate(open: crate::config::MgmtOpen) -> Gate {
        Gate::new(Some(crate::net::auth::MgmtToken::from_module(TOKEN.as_bytes()).unwrap()), open)
    }

    /// A context on a connection that already passed `auth` (the tests of the commands
    /// themselves); the token tests below build their own.
    fn ctx(stats: &mut HypervisorStats) -> Context<'_> {
        let access = Access {
            gate: alloc::boxed::Box::leak(alloc::boxed::Box::new(gate(crate::config::MgmtOpen::Read))),
            peer: PEER,
            authenticated: alloc::boxed::Box::leak(alloc::boxed::Box::new(true)),
        };
        Context { role: "standalone", uptime_ms: 1234, replication_running: false, stats, access }
    }

    /// One request from `peer` at `now` through `gate` on a connection with `authenticated`.
    fn ask(
        line: &str,
        stats: &mut HypervisorStats,
        gate: &mut Gate,
        authenticated: &mut bool,
        peer: Ipv4Addr,
        now: u64,
    ) -> (Json, Action) {
        let access = Access { gate, peer, authenticated };
        let mut ctx = Context { role: "standalone", uptime_ms: now, replication_running: false, stats, access };
        let r = handle(line.as_bytes(), &mut ctx);
        (parse_json(r.text.as_bytes()).unwrap(), r.action)
    }

    #[test]
    fn mutating_commands_need_the_token_and_change_nothing_without_it() {
        let mut stats = HypervisorStats::new();
        let mut g = gate(crate::config::MgmtOpen::Read);
        let mut authed = false;
        for (i, line) in [
            r#"{"cmd":"set","key":"heartbeat_ms","value":50}"#,
            r#"{"cmd":"shutdown","token":"test-token-0123456789abcdeX"}"#,
            r#"{"cmd":"checkpoint","token":""}"#,
        ]
        .iter()
        .enumerate()
        {
            let (j, action) = ask(line, &mut stats, &mut g, &mut authed, PEER, i as u64);
            assert_eq!((s(&j, "ok"), s(&j, "error")), ("false".into(), "unauthorized".into()), "{line}");
            assert_eq!(action, Action::Continue, "{line}");
            assert!(!s(&j, "detail").contains("test-token"), "the token is never echoed: {j:?}");
        }
        assert_eq!(stats.tunables.heartbeat_ms, 100);
        // A token that is not a string is a bad request (and no token check).
        let (j, _) = ask(r#"{"cmd":"shutdown","token":7}"#, &mut stats, &mut g, &mut authed, PEER, 5);
        assert_eq!(s(&j, "error"), "bad_request");
        // Arguments are looked at only after the token: an unauthorized `set` learns nothing.
        let (j, _) = ask(r#"{"cmd":"set","key":"colour"}"#, &mut stats, &mut g, &mut authed, PEER, 6);
        assert_eq!(s(&j, "error"), "unauthorized");
        assert_eq!(stats.mgmt.auth.unauthorized, 4);
        // Reads stay open with mgmt_open=read.
        let (j, _) = ask(r#"{"cmd":"tunables"}"#, &mut stats, &mut g, &mut authed, PEER, 7);
        assert_eq!(s(&j, "ok"), "true");
        // The right token from another source works (PEER is blocked by now).
        let other = Ipv4Addr::new(10, 0, 0, 10);
        let line = r#"{"cmd":"set","key":"heartbeat_ms","value":50,"token":"test-token-0123456789abcdef"}"#;
        let (j, _) = ask(line, &mut stats, &mut g, &mut authed, other, 8);
        assert_eq!(s(&j, "ok"), "true", "{j:?}");
        assert_eq!(stats.tunables.heartbeat_ms, 50);
        let shutdown = r#"{"cmd":"shutdown","token":"test-token-0123456789abcdef"}"#;
        let (j, action) = ask(shutdown, &mut stats, &mut g, &mut authed, other, 9);
        assert_eq!((s(&j, "ok"), action), ("true".into(), Action::Shutdown), "{j:?}");
        assert_eq!(stats.mgmt.auth.authorized, 2);
        let (j, _) = ask(r#"{"cmd":"stats"}"#, &mut stats, &mut g, &mut authed, other, 10);
        let auth = j.field("mgmt").and_then(|m| m.field("auth")).expect("auth counters in stats");
        assert_eq!((s(auth, "unauthorized"), s(auth, "authorized")), ("4".into(), "2".into()));
    }

    #[test]
    fn repeated_bad_tokens_are_rate_limited_per_source() {
        let mut stats = HypervisorStats::new();
        let mut g = gate(crate::config::MgmtOpen::Read);
        let mut authed = false;
        let bad = r#"{"cmd":"shutdown","token":"not-the-token-at-all"}"#;
        let good = r#"{"cmd":"shutdown","token":"test-token-0123456789abcdef"}"#;
        for t in 0..4 {
            let (j, _) = ask(bad, &mut stats, &mut g, &mut authed, PEER, t);
            assert_eq!(s(&j, "error"), "unauthorized");
        }
        let (j, action) = ask(good, &mut stats, &mut g, &mut authed, PEER, 10);
        assert_eq!((s(&j, "error"), action), ("rate_limited".into(), Action::Continue));
        assert_eq!(s(&j, "retry_after_ms"), "993");
        assert_eq!(stats.mgmt.auth.rate_limited, 1);
        let (_, action) = ask(good, &mut stats, &mut g, &mut authed, Ipv4Addr::new(10, 0, 0, 77), 10);
        assert_eq!(action, Action::Shutdown, "another source is served");
        let (_, action) = ask(good, &mut stats, &mut g, &mut authed, PEER, 1003);
        assert_eq!(action, Action::Shutdown, "served again once the block is over");
    }

    #[test]
    fn auth_marks_the_connection_and_a_failed_auth_clears_it() {
        let mut stats = HypervisorStats::new();
        let mut g = gate(crate::config::MgmtOpen::None);
        let mut authed = false;
        let (j, _) = ask(r#"{"cmd":"status"}"#, &mut stats, &mut g, &mut authed, PEER, 0);
        assert_eq!(s(&j, "error"), "unauthorized", "mgmt_open=none closes reads");
        let (j, _) =
            ask(r#"{"cmd":"auth","token":"test-token-0123456789abcdef"}"#, &mut stats, &mut g, &mut authed, PEER, 1);
        assert_eq!((s(&j, "ok"), s(&j, "authenticated")), ("true".into(), "true".into()));
        assert!(authed);
        let (j, _) = ask(r#"{"cmd":"status"}"#, &mut stats, &mut g, &mut authed, PEER, 2);
        assert_eq!(s(&j, "ok"), "true");
        let access = j.field("access").unwrap();
        assert_eq!((s(access, "token_configured"), s(access, "open")), ("true".into(), "none".into()));
        let (j, _) = ask(r#"{"cmd":"set","key":"checkpoint_ms","value":20}"#, &mut stats, &mut g, &mut authed, PEER, 3);
        assert_eq!(s(&j, "ok"), "true");
        let (j, _) =
            ask(r#"{"cmd":"auth","token":"wrong-wrong-wrong-wrong"}"#, &mut stats, &mut g, &mut authed, PEER, 4);
        assert_eq!(s(&j, "error"), "unauthorized");
        assert!(!authed);
        let (j, _) = ask(r#"{"cmd":"stats"}"#, &mut stats, &mut g, &mut authed, PEER, 5);
        assert_eq!(s(&j, "error"), "unauthorized");
    }

    #[test]
    fn without_a_token_module_mutating_commands_are_refused() {
        let mut stats = HypervisorStats::new();
        let mut g = Gate::new(None, crate::config::MgmtOpen::Read);
        let mut authed = false;
        let (j, action) =
            ask(r#"{"cmd":"shutdown","token":"anything-anything"}"#, &mut stats, &mut g, &mut authed, PEER, 0);
        assert_eq!((s(&j, "error"), action), ("no_token_configured".into(), Action::Continue));
        assert!(s(&j, "detail").contains("mgmt-token"), "{j:?}");
        let (j, _) = ask(r#"{"cmd":"status"}"#, &mut stats, &mut g, &mut authed, PEER, 1);
        assert_eq!(s(&j, "ok"), "true");
        assert_eq!(s(j.field("access").unwrap(), "token_configured"), "false");
        assert_eq!(stats.mgmt.auth.no_token_configured, 1);
    }

    fn reply(line: &str, stats: &mut HypervisorStats) -> (Json, Action) {
        let r = handle(line.as_bytes(), &mut ctx(stats));
        let json = parse_json(r.text.as_bytes()).unwrap_or_else(|e| panic!("reply is not JSON ({e}): {}", r.text));
        (json, r.action)
    }

    fn s(j: &Json, field: &str) -> String {
        match j.field(field) {
            Some(Json::Str(s)) => s.clone(),
            Some(Json::Number(n)) => n.clone(),
            Some(Json::Bool(b)) => b.to_string(),
            other => panic!("{field}: {other:?}"),
        }
    }

    #[test]
    fn json_parser_accepts_the_grammar() {
        let j = parse_json(br#" {"a": [1, -2.5e3, true, false, null, "x\"\\\/\n\u00e9"], "b": {}} "#).unwrap();
        let Json::Object(m) = &j else { panic!() };
        assert_eq!(m.len(), 2);
        let Some(Json::Array(items)) = j.field("a") else { panic!() };
        assert_eq!(items[1], Json::Number("-2.5e3".into()));
        assert_eq!(items[5], Json::Str("x\"\\/\n\u{e9}".into()));
    }

    #[test]
    fn json_errors_name_position_and_expectation() {
        let e = parse_json(b"{\"cmd\" \"status\"}").unwrap_err();
        assert_eq!(e.to_string(), "expected `:` at byte 7, found `\"`");
        assert_eq!(parse_json(b"").unwrap_err().found, "end of input");
        assert!(parse_json(b"{} x").unwrap_err().to_string().contains("end of input after the JSON value"));
        assert!(parse_json(b"[1,]").is_err());
        assert!(parse_json(b"\"\x01\"").is_err());
        assert!(parse_json(b"\"\\q\"").is_err());
        assert!(parse_json(b"01a").is_err());
        assert!(parse_json(b"\"\xff\"").unwrap_err().to_string().contains("UTF-8"));
        let deep = "[".repeat(100) + &"]".repeat(100);
        assert!(parse_json(deep.as_bytes()).unwrap_err().to_string().contains("nesting"));
    }

    /// The leniencies issue 16 found, each refused with a message naming what was expected.
    #[test]
    fn json_is_strict_rfc_8259() {
        for (text, needle) in [
            (r#"{"cmd":"st\u+041atus"}"#, "expected 4 hex digits after `\\u` at byte 12, found `+`"),
            (r#""\u 041""#, "4 hex digits"),
            (r#""\u04""#, "4 hex digits"),
            (r#"{"cmd":"set","key":"heartbeat_ms","value":050}"#, "no leading zeros"),
            ("-01", "no leading zeros"),
            ("00", "no leading zeros"),
            (r#""\ud83d""#, "low surrogate"),
            (r#""\ud83dx""#, "low surrogate"),
            (r#""\ud83d\u0041""#, "a low surrogate (DC00-DFFF) after a high surrogate"),
            (r#""\ud83d\ud83d""#, "a low surrogate"),
            (r#""\ude00""#, "a high surrogate (D800-DBFF) before a low surrogate"),
            (r#"{"cmd":"status","cmd":"shutdown"}"#, "a member name not used before"),
        ] {
            let err = parse_json(text.as_bytes()).expect_err(text);
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
        // What RFC 8259 does allow.
        for (text, value) in [
            (r#""\ud83d\ude00""#, Json::Str("\u{1f600}".into())),
            (r#""\uD834\uDD1E""#, Json::Str("\u{1d11e}".into())),
            (r#""\u0041\u00e9\uFFFF""#, Json::Str("A\u{e9}\u{ffff}".into())),
            ("0", Json::Number("0".into())),
            ("-0.5e+3", Json::Number("-0.5e+3".into())),
            ("10", Json::Number("10".into())),
        ] {
            assert_eq!(parse_json(text.as_bytes()), Ok(value), "{text}");
        }
    }

    #[test]
    fn strict_json_cases_are_refused_as_requests_by_name() {
        let mut stats = HypervisorStats::new();
        let (j, _) = reply(r#"{"cmd":"st\u+041atus"}"#, &mut stats);
        assert_eq!(s(&j, "error"), "bad_json");
        let (j, _) = reply(r#"{"cmd":"set","key":"heartbeat_ms","value":050}"#, &mut stats);
        assert_eq!(s(&j, "error"), "bad_json");
        assert!(s(&j, "detail").contains("no leading zeros"), "{j:?}");
        assert_eq!(stats.tunables.heartbeat_ms, 100);
        let (j, _) = reply(r#"{"cmd":"\ud83d\ude00"}"#, &mut stats);
        assert_eq!(s(&j, "error"), "unknown_command");
        assert!(s(&j, "detail").contains("unknown command `\u{1f600}`"), "{j:?}");
    }

    #[test]
    fn status_and_stats_report_the_heap_and_server_counters() {
        let mut stats = HypervisorStats::new();
        stats.heap = HeapUsage { size: 1000, used: 300, free: 700, high_water: 450, alloc_failures: 0 };
        stats.mgmt.json.evicted = 3;
        stats.mgmt.http.not_reading = 2;
        let (j, _) = reply(r#"{"cmd":"status"}"#, &mut stats);
        let heap = j.field("heap").expect("heap in status");
        assert_eq!(
            (s(heap, "used"), s(heap, "free"), s(heap, "high_water")),
            ("300".into(), "700".into(), "450".into())
        );
        let (j, _) = reply(r#"{"cmd":"stats"}"#, &mut stats);
        let m = j.field("mgmt").unwrap();
        assert_eq!(s(m.field("json").unwrap(), "evicted"), "3");
        assert_eq!(s(m.field("http").unwrap(), "not_reading"), "2");
        assert_eq!(s(j.field("heap").unwrap(), "size"), "1000");
    }

    #[test]
    fn status_says_whether_the_replication_link_is_sealed() {
        let mut stats = HypervisorStats::new();
        let (j, _) = reply(r#"{"cmd":"status"}"#, &mut stats);
        assert!(j.field("repl_auth").is_none(), "a standalone host has no link: {j:?}");
        stats.repl_auth = Some(true);
        let (j, _) = reply(r#"{"cmd":"status"}"#, &mut stats);
        assert_eq!(s(&j, "repl_auth"), "on");
        assert!(j.field("repl_auth_warning").is_none());
        stats.repl_auth = Some(false);
        let (j, _) = reply(r#"{"cmd":"status"}"#, &mut stats);
        assert_eq!(s(&j, "repl_auth"), "off");
        assert!(s(&j, "repl_auth_warning").contains("neither authenticated nor encrypted"));
    }

    #[test]
    fn status_reports_role_uptime_and_nics() {
        let mut stats = HypervisorStats::new();
        let nic = stats.nic_mut(0);
        nic.roles = "mgmt+client".into();
        nic.mac = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
        nic.counters.rx_frames = 7;
        stats.guest_mut("g1").state = GuestState::Running;
        let (j, action) = reply(r#"{"cmd":"status"}"#, &mut stats);
        assert_eq!(action, Action::Continue);
        assert_eq!(s(&j, "ok"), "true");
        assert_eq!(s(&j, "role"), "standalone");
        assert_eq!(s(&j, "uptime_ms"), "1234");
        let Some(Json::Array(nics)) = j.field("nics") else { panic!("{j:?}") };
        assert_eq!(s(&nics[0], "mac"), "52:54:00:12:34:56");
        assert_eq!(s(&nics[0], "rx_frames"), "7");
        let Some(Json::Array(guests)) = j.field("guests") else { panic!() };
        assert_eq!(s(&guests[0], "state"), "running");
        assert_eq!(stats.mgmt.requests, 1);
    }

    #[test]
    fn stats_lists_every_exit_kind_and_mgmt_counters() {
        let mut stats = HypervisorStats::new();
        stats.guest_mut("g").exits.record(&VmExit::Hlt);
        let (j, _) = reply(r#"{"cmd":"stats"}"#, &mut stats);
        let Some(Json::Array(guests)) = j.field("guests") else { panic!() };
        let exits = guests[0].field("exits").unwrap();
        assert_eq!(s(exits, "hlt"), "1");
        assert_eq!(s(exits, "total"), "1");
        assert_eq!(s(j.field("mgmt").unwrap(), "requests"), "1");
    }

    #[test]
    fn set_changes_a_tunable_within_range() {
        let mut stats = HypervisorStats::new();
        let (j, _) = reply(r#"{"cmd":"set","key":"heartbeat_ms","value":50}"#, &mut stats);
        assert_eq!((s(&j, "ok"), s(&j, "old"), s(&j, "value")), ("true".into(), "100".into(), "50".into()));
        assert_eq!(stats.tunables.heartbeat_ms, 50);
        let (j, _) = reply(r#"{"cmd":"tunables"}"#, &mut stats);
        assert_eq!(s(j.field("tunables").unwrap(), "heartbeat_ms"), "50");
        for (line, code, needle) in [
            (r#"{"cmd":"set","key":"heartbeat_ms","value":5}"#, "bad_value", "bad value `5` for `heartbeat_ms`"),
            (r#"{"cmd":"set","key":"heartbeat_ms","value":1.5}"#, "bad_value", "from 10 to 10000"),
            (r#"{"cmd":"set","key":"colour","value":5}"#, "unknown_tunable", "`colour`"),
            (r#"{"cmd":"set","key":"heartbeat_ms"}"#, "bad_request", "no `value`"),
            (r#"{"cmd":"set","value":5}"#, "bad_request", "no `key`"),
            (r#"{"cmd":"set","key":"heartbeat_ms","value":[]}"#, "bad_request", "is an array"),
        ] {
            let (j, action) = reply(line, &mut stats);
            assert_eq!(action, Action::Continue);
            assert_eq!(s(&j, "error"), code, "{line}");
            assert!(s(&j, "detail").contains(needle), "{line}: {}", s(&j, "detail"));
        }
        assert_eq!(stats.tunables.heartbeat_ms, 50);
    }

    #[test]
    fn bad_requests_get_named_errors() {
        let mut stats = HypervisorStats::new();
        for (line, code, needle) in [
            ("{\"cmd\":", "bad_json", "expected a JSON value at byte 7, found end of input"),
            ("garbage", "bad_json", "found `g`"),
            ("[1]", "bad_request", "request is an array"),
            ("{}", "bad_request", "no `cmd`"),
            ("{\"cmd\":7}", "bad_request", "`cmd` is a number"),
            ("{\"cmd\":\"reboot\"}", "unknown_command", "unknown command `reboot`; accepted: status"),
        ] {
            let (j, action) = reply(line, &mut stats);
            assert_eq!(action, Action::Continue, "{line}");
            assert_eq!(s(&j, "ok"), "false");
            assert_eq!(s(&j, "error"), code, "{line}");
            assert!(s(&j, "detail").contains(needle), "{line}: {}", s(&j, "detail"));
        }
        assert_eq!(stats.mgmt.request_errors, 6);
    }

    #[test]
    fn oversized_request_closes_the_connection() {
        let mut stats = HypervisorStats::new();
        let big = alloc::vec![b' '; MAX_REQUEST_BYTES + 1];
        let r = handle(&big, &mut ctx(&mut stats));
        assert_eq!(r.action, Action::Close);
        assert!(r.text.contains("too_large") && r.text.contains("at most 4096 bytes"), "{}", r.text);
    }

    #[test]
    fn checkpoint_and_failover_are_honest() {
        let mut stats = HypervisorStats::new();
        for cmd in ["checkpoint", "failover"] {
            let (j, _) = reply(&crate::net::mgmt::format(format_args!("{{\"cmd\":\"{cmd}\"}}")), &mut stats);
            assert_eq!(s(&j, "ok"), "false");
            assert_eq!(s(&j, "accepted"), "true");
            assert!(s(&j, "detail").contains("not available until replication is running"));
        }
    }

    fn colo_report(role: &'static str, link: &'static str) -> ColoReport {
        let mut c = ColoReport { role, link, epoch: 7, committed: 6, ..ColoReport::default() };
        c.checkpoints_by_cause = [1, 2, 3, 4, 5, 6];
        c.pause_us = crate::stats::Sample { last: 30, total: 100, count: 4 };
        c.link_errors = [("bad_magic", 2), ("b", 0), ("c", 0), ("d", 0), ("e", 0), ("f", 0), ("g", 0), ("h", 0)];
        c.digest = Some((6, 0x1234_5678_9abc_def0));
        c
    }

    #[test]
    fn status_and_stats_carry_the_colo_counters() {
        let mut stats = HypervisorStats::new();
        stats.colo = Some(colo_report("primary", "colo"));
        for cmd in ["status", "stats"] {
            let line = crate::net::mgmt::format(format_args!("{{\"cmd\":\"{cmd}\"}}"));
            let r = handle(line.as_bytes(), &mut Context { role: "primary", ..ctx(&mut stats) });
            let j = parse_json(r.text.as_bytes()).unwrap();
            let colo = j.field("colo").unwrap_or_else(|| panic!("no colo in {}", r.text));
            assert_eq!(s(colo, "link"), "colo");
            assert_eq!(s(colo, "epoch"), "7");
            assert_eq!(s(colo.field("checkpoints_by_cause").unwrap(), "manual"), "5");
            assert_eq!(s(colo.field("checkpoints_by_cause").unwrap(), "full_sync"), "6");
            assert_eq!(s(colo.field("pause_us").unwrap(), "mean"), "25");
            assert_eq!(s(colo.field("link_errors").unwrap(), "bad_magic"), "2");
            assert_eq!(s(colo, "digest"), "6:12345678-9abcdef0");
        }
        let j = parse_json(handle(br#"{"cmd":"status"}"#, &mut ctx(&mut stats)).text.as_bytes()).unwrap();
        assert_eq!(s(&j, "replication"), "running");
    }

    #[test]
    fn checkpoint_is_taken_by_a_running_primary_only() {
        let mut stats = HypervisorStats::new();
        stats.colo = Some(colo_report("primary", "colo"));
        let mut c = Context { role: "primary", ..ctx(&mut stats) };
        let j = parse_json(handle(br#"{"cmd":"checkpoint"}"#, &mut c).text.as_bytes()).unwrap();
        assert_eq!((s(&j, "ok"), s(&j, "accepted"), s(&j, "epoch")), ("true".into(), "true".into(), "7".into()));
        assert_eq!(stats.colo_checkpoint_requests, 1);
        // A secondary refuses by name; a primary whose link is down too.
        stats.colo = Some(colo_report("secondary", "colo"));
        let mut c = Context { role: "secondary", ..ctx(&mut stats) };
        let j = parse_json(handle(br#"{"cmd":"checkpoint"}"#, &mut c).text.as_bytes()).unwrap();
        assert_eq!((s(&j, "ok"), s(&j, "error")), ("false".into(), "not_available".into()));
        assert!(s(&j, "detail").contains("taken by the primary"));
        stats.colo = Some(colo_report("primary", "syncing"));
        let mut c = Context { role: "primary", ..ctx(&mut stats) };
        let j = parse_json(handle(br#"{"cmd":"checkpoint"}"#, &mut c).text.as_bytes()).unwrap();
        assert_eq!(s(&j, "ok"), "false");
        assert_eq!(stats.colo_checkpoint_requests, 1);
    }

    #[test]
    fn failover_on_a_replicating_host_is_handed_to_the_node_and_status_shows_its_state() {
        let mut stats = HypervisorStats::new();
        stats.failover = Some(crate::stats::FailoverInfo {
            generation: 3,
            role: "primary".into(),
            peer: "lost",
            witness: "10.78.1.5:2379".into(),
            last_claim: Some(3),
            last_result: Some("granted"),
            last_latency_ms: 4,
            fenced: Some("the witness gave generation 3 to host 9".into()),
            ..Default::default()
        });
        let (j, _) = reply(r#"{"cmd":"failover"}"#, &mut stats);
        assert_eq!(s(&j, "ok"), "true");
        assert!(stats.failover_requested, "the node is asked");
        let j = handle(br#"{"cmd":"status"}"#, &mut ctx(&mut stats)).text;
        assert!(parse_json(j.as_bytes()).is_ok(), "{j}");
        assert!(j.contains(r#""generation":3"#), "{j}");
        assert!(j.contains(r#""last_result":"granted""#), "{j}");
        assert!(j.contains(r#""fenced":true"#), "{j}");
        assert!(j.contains("the witness gave generation 3 to host 9"), "{j}");
    }

    #[test]
    fn shutdown_asks_the_transport_to_end() {
        let mut stats = HypervisorStats::new();
        let (j, action) = reply(r#"{"cmd":"shutdown"}"#, &mut stats);
        assert_eq!(action, Action::Shutdown);
        assert_eq!(s(&j, "ok"), "true");
    }

    #[test]
    fn long_unknown_names_are_truncated_and_escaped() {
        let mut stats = HypervisorStats::new();
        let name = "\"x".repeat(200);
        let line = crate::net::mgmt::format(format_args!("{{\"cmd\":{}}}", {
            let mut s = String::new();
            push_json_str(&mut s, &name);
            s
        }));
        let (j, _) = reply(&line, &mut stats);
        assert!(s(&j, "detail").contains("..."));
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_get_a_json_reply(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..300)) {
            let mut stats = HypervisorStats::new();
            let r = handle(&bytes, &mut ctx(&mut stats));
            proptest::prop_assert!(parse_json(r.text.as_bytes()).is_ok());
        }
    }
}
