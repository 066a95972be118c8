//! HTTP/1.1 for the witness client: one request out, one response in (RFC 9112).
//!
//! [`ResponseReader`] is fed whatever bytes the connection delivers and answers once the whole
//! response has arrived. Everything it buffers is bounded ([`MAX_HEAD_BYTES`],
//! [`MAX_BODY_BYTES`]): a peer cannot make it grow further, only earn a named [`HttpError`].

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// The longest status line plus header section accepted.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// The longest body accepted (after chunked decoding). etcd's replies to the witness's requests
/// are a few hundred bytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// Why a response was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpError {
    /// The status line and headers exceed [`MAX_HEAD_BYTES`].
    HeadTooLarge,
    /// The body exceeds [`MAX_BODY_BYTES`] (declared or received).
    BodyTooLarge {
        /// Bytes declared or received so far.
        bytes: u64,
    },
    /// The status line is not `HTTP/1.x NNN reason`.
    BadStatusLine(String),
    /// A header line without a colon, or with bytes that are not visible ASCII.
    BadHeader(String),
    /// `Content-Length` is not a decimal number, or appears twice with different values.
    BadContentLength(String),
    /// A `Transfer-Encoding` other than `chunked`.
    UnsupportedTransferEncoding(String),
    /// A chunk-size line that is not hexadecimal, or chunk data not followed by CRLF.
    BadChunk(String),
    /// The connection closed before the response was complete.
    Truncated {
        /// Which part was missing.
        while_reading: &'static str,
    },
    /// Bytes after a complete response on a request/response connection.
    TrailingBytes(usize),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::HeadTooLarge => write!(f, "response head longer than {MAX_HEAD_BYTES} bytes"),
            Self::BodyTooLarge { bytes } => write!(f, "response body of {bytes} bytes; at most {MAX_BODY_BYTES}"),
            Self::BadStatusLine(l) => write!(f, "bad status line `{l}`; expected `HTTP/1.x NNN reason`"),
            Self::BadHeader(l) => write!(f, "bad header line `{l}`; expected `name: value`"),
            Self::BadContentLength(v) => write!(f, "bad Content-Length `{v}`; expected one decimal length"),
            Self::UnsupportedTransferEncoding(v) => {
                write!(f, "Transfer-Encoding `{v}` not supported; expected `chunked`")
            }
            Self::BadChunk(l) => write!(f, "bad chunk `{l}`; expected a hex size line, data, CRLF"),
            Self::Truncated { while_reading } => write!(f, "connection closed while reading the {while_reading}"),
            Self::TrailingBytes(n) => write!(f, "{n} bytes after the end of the response"),
        }
    }
}

/// A complete response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The body, chunked encoding removed.
    pub body: Vec<u8>,
}

/// Writes a `POST` request with a JSON body (`Connection: close` is not sent: etcd keeps the
/// connection open, and the reader knows where each response ends).
pub fn post_json(host: &str, path: &str, authorization: Option<&str>, body: &str) -> Vec<u8> {
    let mut out = String::with_capacity(160 + body.len());
    out.push_str("POST ");
    out.push_str(path);
    out.push_str(" HTTP/1.1\r\nHost: ");
    out.push_str(host);
    out.push_str("\r\nContent-Type: application/json\r\nAccept: application/json\r\n");
    if let Some(token) = authorization {
        out.push_str("Authorization: ");
        out.push_str(token);
        out.push_str("\r\n");
    }
    out.push_str("Content-Length: ");
    push_decimal(&mut out, body.len() as u64);
    out.push_str("\r\n\r\n");
    out.push_str(body);
    out.into_bytes()
}

fn push_decimal(out: &mut String, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[i..].iter().map(|&d| d as char));
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Head,
    /// Reading the body (fixed length or until close).
    Body,
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Reading this many bytes of chunk data, then CRLF.
    ChunkData(usize),
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
    Done,
}

/// Parses one response from a byte stream fed in arbitrary pieces.
#[derive(Debug)]
pub struct ResponseReader {
    /// Bytes received and not yet consumed (bounded by the head and body limits).
    pending: Vec<u8>,
    stage: Stage,
    status: u16,
    framing: Framing,
    body: Vec<u8>,
    /// The reply to a `HEAD` request or a 204/304 has no body.
    no_body: bool,
}

impl Default for ResponseReader {
    fn default() -> Self {
        Self::new()
    }
}

impl ResponseReader {
    /// A reader for the response to a request that may have a body.
    pub fn new() -> Self {
        Self {
            pending: Vec::new(),
            stage: Stage::Head,
            status: 0,
            framing: Framing::UntilClose,
            body: Vec::new(),
            no_body: false,
        }
    }

    /// Feeds received bytes. `Ok(Some(response))` once complete; `Ok(None)` while more is needed.
    /// After a complete response, more bytes are [`HttpError::TrailingBytes`].
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Response>, HttpError> {
        if self.stage == Stage::Done {
            return if bytes.is_empty() { Ok(None) } else { Err(HttpError::TrailingBytes(bytes.len())) };
        }
        let room = MAX_HEAD_BYTES + MAX_BODY_BYTES + 64;
        if self.pending.len() + bytes.len() > room {
            // More than any acceptable response can hold in flight: refuse before buffering.
            return Err(match self.stage {
                Stage::Head => HttpError::HeadTooLarge,
                _ => HttpError::BodyTooLarge { bytes: (self.body.len() + self.pending.len() + bytes.len()) as u64 },
            });
        }
        self.pending.extend_from_slice(bytes);
        self.advance()
    }

    /// The connection closed: completes a close-delimited body, or reports what was cut off.
    pub fn finish(&mut self) -> Result<Response, HttpError> {
        match self.stage {
            Stage::Done => Err(HttpError::TrailingBytes(0)),
            Stage::Body if self.framing == Framing::UntilClose => {
                self.stage = Stage::Done;
                Ok(Response { status: self.status, body: core::mem::take(&mut self.body) })
            }
            Stage::Head => Err(HttpError::Truncated { while_reading: "status line and headers" }),
            Stage::Body => Err(HttpError::Truncated { while_reading: "body" }),
            Stage::ChunkSize | Stage::ChunkData(_) => Err(HttpError::Truncated { while_reading: "chunked body" }),
            Stage::Trailers => Err(HttpError::Truncated { while_reading: "trailers" }),
        }
    }

    fn advance(&mut self) -> Result<Option<Response>, HttpError> {
        loop {
            match self.stage {
                Stage::Head => {
                    let Some(end) = find(&self.pending, b"\r\n\r\n") else {
                        if self.pending.len() > MAX_HEAD_BYTES {
                            return Err(HttpError::HeadTooLarge);
                        }
                        return Ok(None);
                    };
                    if end + 4 > MAX_HEAD_BYTES {
                        return Err(HttpError::HeadTooLarge);
                    }
                    let head: Vec<u8> = self.pending.drain(..end + 4).collect();
                    self.parse_head(&head[..end])?;
                }
                Stage::Body => match self.framing {
                    Framing::Length(n) => {
                        let take = (n - self.body.len()).min(self.pending.len());
                        self.body.extend(self.pending.drain(..take));
                        if self.body.len() < n {
                            return Ok(None);
                        }
                        return self.complete();
                    }
                    Framing::UntilClose => {
                        self.take_body_bytes(self.pending.len())?;
                        return Ok(None);
                    }
                    Framing::Chunked => self.stage = Stage::ChunkSize,
                },
                Stage::ChunkSize => {
                    let Some(line) = self.take_line()? else { return Ok(None) };
                    let size_text = line.split(|&b| b == b';').next().unwrap_or(&[]);
                    let size_text = trim(size_text);
                    let size = parse_hex(size_text).ok_or_else(|| HttpError::BadChunk(lossy(&line)))?;
                    if self.body.len() as u64 + size > MAX_BODY_BYTES as u64 {
                        return Err(HttpError::BodyTooLarge { bytes: self.body.len() as u64 + size });
                    }
                    self.stage = if size == 0 { Stage::Trailers } else { Stage::ChunkData(size as usize) };
                }
                Stage::ChunkData(left) => {
                    if self.pending.len() < left + 2 {
                        return Ok(None);
                    }
                    if &self.pending[left..left + 2] != b"\r\n" {
                        return Err(HttpError::BadChunk(lossy(&self.pending[left..left + 2])));
                    }
                    self.take_body_bytes(left)?;
                    self.pending.drain(..2);
                    self.stage = Stage::ChunkSize;
                }
                Stage::Trailers => {
                    let Some(line) = self.take_line()? else { return Ok(None) };
                    if line.is_empty() {
                        return self.complete();
                    }
                    check_header_line(&line)?;
                }
                Stage::Done => return Ok(None),
            }
        }
    }

    fn complete(&mut self) -> Result<Option<Response>, HttpError> {
        self.stage = Stage::Done;
        if !self.pending.is_empty() {
            return Err(HttpError::TrailingBytes(self.pending.len()));
        }
        Ok(Some(Response { status: self.status, body: core::mem::take(&mut self.body) }))
    }

    fn take_body_bytes(&mut self, n: usize) -> Result<(), HttpError> {
        if self.body.len() + n > MAX_BODY_BYTES {
            return Err(HttpError::BodyTooLarge { bytes: (self.body.len() + n) as u64 });
        }
        self.body.extend(self.pending.drain(..n));
        Ok(())
    }

    /// One CRLF-terminated line (without the CRLF), bounded like a header line.
    fn take_line(&mut self) -> Result<Option<Vec<u8>>, HttpError> {
        match find(&self.pending, b"\r\n") {
            Some(end) => {
                let line: Vec<u8> = self.pending.drain(..end).collect();
                self.pending.drain(..2);
                Ok(Some(line))
            }
            None if self.pending.len() > MAX_HEAD_BYTES => Err(HttpError::HeadTooLarge),
            None => Ok(None),
        }
    }

    fn parse_head(&mut self, head: &[u8]) -> Result<(), HttpError> {
        let mut lines = head.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
        let status_line = lines.next().unwrap_or(&[]);
        self.status = parse_status_line(status_line).ok_or_else(|| HttpError::BadStatusLine(lossy(status_line)))?;
        let mut length: Option<usize> = None;
        let mut chunked = false;
        for line in lines {
            let (name, value) = check_header_line(line)?;
            if name.eq_ignore_ascii_case(b"content-length") {
                let text = lossy(value);
                let n: usize = core::str::from_utf8(value)
                    .ok()
                    .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| HttpError::BadContentLength(text.clone()))?;
                if length.is_some_and(|old| old != n) {
                    return Err(HttpError::BadContentLength(text));
                }
                if n > MAX_BODY_BYTES {
                    return Err(HttpError::BodyTooLarge { bytes: n as u64 });
                }
                length = Some(n);
            } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
                if !value.eq_ignore_ascii_case(b"chunked") {
                    return Err(HttpError::UnsupportedTransferEncoding(lossy(value)));
                }
                chunked = true;
            }
        }
        // RFC 9112 §6.3: chunked wins over Content-Length; 1xx, 204 and 304 have no body.
        self.no_body = self.no_body || matches!(self.status, 100..=199 | 204 | 304);
        self.framing = if self.no_body {
            Framing::Length(0)
        } else if chunked {
            Framing::Chunked
        } else if let Some(n) = length {
            Framing::Length(n)
        } else {
            Framing::UntilClose
        };
        self.stage = Stage::Body;
        Ok(())
    }
}

fn parse_status_line(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (&minor, rest) = rest.split_first()?;
    if !minor.is_ascii_digit() || rest.first() != Some(&b' ') || rest.len() < 4 {
        return None;
    }
    let code = &rest[1..4];
    if !code.iter().all(u8::is_ascii_digit) || rest.get(4).is_some_and(|&b| b != b' ') {
        return None;
    }
    Some(code.iter().fold(0u16, |n, &d| n * 10 + u16::from(d - b'0')))
}

/// Splits `name: value`; the name is a token, the value visible ASCII or tabs/spaces.
fn check_header_line(line: &[u8]) -> Result<(&[u8], &[u8]), HttpError> {
    let bad = || HttpError::BadHeader(lossy(line));
    let colon = line.iter().position(|&b| b == b':').ok_or_else(bad)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    let token = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if name.is_empty() || !name.iter().all(token) {
        return Err(bad());
    }
    if !value.iter().all(|&b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80) {
        return Err(bad());
    }
    Ok((name, trim(value)))
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 15 {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| Some(n * 16 + u64::from((b as char).to_digit(16)?)))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn lossy(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(80)];
    shown.iter().map(|&b| if (b' '..=b'~').contains(&b) { b as char } else { '?' }).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed_all(reader: &mut ResponseReader, bytes: &[u8], piece: usize) -> Result<Option<Response>, HttpError> {
        let mut last = None;
        for chunk in bytes.chunks(piece.max(1)) {
            if let Some(r) = reader.push(chunk)? {
                last = Some(r);
            }
        }
        Ok(last)
    }

    #[test]
    fn request_has_length_host_and_body() {
        let req = post_json("10.0.0.9:2379", "/v3/kv/txn", Some("tok"), "{\"a\":1}");
        let text = String::from_utf8(req).unwrap();
        assert_eq!(
            text,
            "POST /v3/kv/txn HTTP/1.1\r\nHost: 10.0.0.9:2379\r\nContent-Type: application/json\r\n\
             Accept: application/json\r\nAuthorization: tok\r\nContent-Length: 7\r\n\r\n{\"a\":1}"
        );
    }

    #[test]
    fn content_length_response_in_any_pieces() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 5\r\n\r\nhello";
        for piece in 1..raw.len() {
            let mut r = ResponseReader::new();
            let resp = feed_all(&mut r, raw, piece).unwrap().expect("complete");
            assert_eq!(resp, Response { status: 200, body: b"hello".to_vec() });
        }
    }

    #[test]
    fn chunked_response_with_extensions_and_trailers() {
        let raw = b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nTrailer: Grpc-Status\r\n\r\n\
                    4;ext=1\r\n{\"er\r\n3\r\nr\":\r\n2\r\n1}\r\n0\r\nGrpc-Status: 5\r\n\r\n";
        for piece in 1..raw.len() {
            let mut r = ResponseReader::new();
            let resp = feed_all(&mut r, raw, piece).unwrap().expect("complete");
            assert_eq!(resp.status, 404);
            assert_eq!(resp.body, b"{\"err\":1}");
        }
    }

    #[test]
    fn close_delimited_body_ends_at_finish() {
        let mut r = ResponseReader::new();
        assert_eq!(r.push(b"HTTP/1.0 200 OK\r\n\r\nabc").unwrap(), None);
        assert_eq!(r.finish().unwrap(), Response { status: 200, body: b"abc".to_vec() });
    }

    #[test]
    fn malformed_responses_are_named() {
        let cases: &[(&[u8], HttpError)] = &[
            (b"HTTP/2 200 OK\r\n\r\n", HttpError::BadStatusLine("HTTP/2 200 OK".into())),
            (b"HTTP/1.1 20 OK\r\n\r\n", HttpError::BadStatusLine("HTTP/1.1 20 OK".into())),
            (b"HTTP/1.1 200 OK\r\nbad header\r\n\r\n", HttpError::BadHeader("bad header".into())),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1x\r\n\r\n", HttpError::BadContentLength("1x".into())),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                HttpError::BadContentLength("2".into()),
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 99999999\r\n\r\n", HttpError::BodyTooLarge { bytes: 99_999_999 }),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                HttpError::UnsupportedTransferEncoding("gzip".into()),
            ),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", HttpError::BadChunk("zz".into())),
            (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXY", HttpError::BadChunk("XY".into())),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffff\r\n",
                HttpError::BodyTooLarge { bytes: 0xfffff },
            ),
            (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nab", HttpError::TrailingBytes(1)),
        ];
        for (raw, expected) in cases {
            let mut r = ResponseReader::new();
            assert_eq!(r.push(raw).as_ref().err(), Some(expected), "{}", String::from_utf8_lossy(raw));
        }
    }

    #[test]
    fn head_and_unterminated_lines_are_bounded() {
        let mut r = ResponseReader::new();
        let mut err = None;
        for _ in 0..10_000 {
            if let Err(e) = r.push(b"HTTP/1.1 200 OK\r\nX: yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy") {
                err = Some(e);
                break;
            }
        }
        assert_eq!(err, Some(HttpError::HeadTooLarge));
        let mut r = ResponseReader::new();
        r.push(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap();
        let mut err = None;
        for _ in 0..10_000 {
            if let Err(e) = r.push(b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa") {
                err = Some(e);
                break;
            }
        }
        assert!(matches!(err, Some(HttpError::HeadTooLarge)), "{err:?}");
    }

    #[test]
    fn truncation_is_named_by_part() {
        let mut r = ResponseReader::new();
        r.push(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab").unwrap();
        assert_eq!(r.finish(), Err(HttpError::Truncated { while_reading: "body" }));
        let mut r = ResponseReader::new();
        r.push(b"HTTP/1.1 200").unwrap();
        assert_eq!(r.finish(), Err(HttpError::Truncated { while_reading: "status line and headers" }));
    }

    #[test]
    fn no_body_statuses() {
        let mut r = ResponseReader::new();
        assert_eq!(
            r.push(b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n").unwrap(),
            Some(Response { status: 204, body: Vec::new() })
        );
    }
}
