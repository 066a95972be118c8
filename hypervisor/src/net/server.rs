//! The bounds every TCP server of the hypervisor keeps, as pure, host-tested pieces: the JSON
//! API and the metrics page use them today, and any other server fed by a remote peer (the
//! replication link) should use them too.
//!
//! - [`OutBuf`]: a per-connection output buffer with a fixed capacity; a reply that does not fit
//!   is refused (the transport then closes the connection as `not_reading`) instead of growing.
//! - [`LineReader`]: one request line at a time, never more than its limit.
//! - [`Timers`]: per-connection clocks and the single place their limits are checked: a whole
//!   request within [`Limits::request_deadline_ms`] of its first byte, no silence longer than
//!   [`Limits::idle_timeout_ms`], and queued output that makes no progress for
//!   [`Limits::write_stall_ms`] means the peer stopped reading.
//! - [`choose_victim`]: when every slot is taken, which connection to close so a new client gets
//!   in (the oldest idle one first, then the oldest slow request), instead of refusing.
//!
//! Times are milliseconds of the hypervisor clock; nothing here reads a clock or a socket.
#![deny(unsafe_code)]

use alloc::vec::Vec;
use core::fmt;

/// The limits of one server. The transport also serves at most `requests_per_poll` requests and
/// reads at most `read_budget` bytes per connection per poll, so one busy client cannot starve
/// the others.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connection slots (TCP sockets) of the server.
    pub slots: usize,
    /// Slots kept listening: when fewer are free, an idle or slow connection is evicted.
    pub spare_listeners: usize,
    /// The longest request (line or head), in bytes.
    pub max_request: usize,
    /// Bytes of output queued per connection beyond the socket's own send buffer.
    pub out_capacity: usize,
    /// New requests are read only while less than this much output is queued.
    pub out_high_water: usize,
    /// A whole request must arrive within this long of its first byte.
    pub request_deadline_ms: u64,
    /// A connection with nothing in progress and nothing received or sent for this long is
    /// closed. The only idle timeout: the TCP stack's own is switched off.
    pub idle_timeout_ms: u64,
    /// Queued output that makes no progress for this long means the peer does not read.
    pub write_stall_ms: u64,
    /// After the server closes its side, how long the peer has to close before a reset.
    pub linger_ms: u64,
    /// A connection is never evicted before it has been idle (or its request slow) this long.
    pub evict_grace_ms: u64,
    /// Requests answered per connection per poll.
    pub requests_per_poll: usize,
    /// Bytes read per connection per poll.
    pub read_budget: usize,
}

/// Why a connection is closed by the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    /// Nothing in progress and no traffic for [`Limits::idle_timeout_ms`].
    Idle,
    /// A request started and did not complete within [`Limits::request_deadline_ms`].
    RequestDeadline,
    /// Output queued and not taken by the peer for [`Limits::write_stall_ms`].
    NotReading,
}

impl Expiry {
    /// The short name used in counters and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::RequestDeadline => "request_deadline",
            Self::NotReading => "not_reading",
        }
    }
}

/// A reply did not fit the connection's output buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Overflow {
    /// Bytes already queued.
    pub queued: usize,
    /// Bytes that were to be added.
    pub adding: usize,
    /// The buffer's capacity.
    pub capacity: usize,
}

impl fmt::Display for Overflow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "output of {} bytes does not fit: {} bytes already queued, expected at most {} in all",
            self.adding, self.queued, self.capacity
        )
    }
}

/// A bounded output buffer: bytes waiting for the peer to take them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutBuf {
    buf: Vec<u8>,
    capacity: usize,
}

impl OutBuf {
    /// An empty buffer that will hold at most `capacity` bytes (nothing is allocated yet).
    pub fn new(capacity: usize) -> Self {
        Self { buf: Vec::new(), capacity }
    }

    /// Queues `bytes` whole, or nothing when they do not fit.
    pub fn push(&mut self, bytes: &[u8]) -> Result<(), Overflow> {
        if bytes.len() > self.capacity - self.buf.len() {
            return Err(Overflow { queued: self.buf.len(), adding: bytes.len(), capacity: self.capacity });
        }
        self.buf.extend_from_slice(bytes);
        Ok(())
    }

    /// Queues several parts whole (all or none).
    pub fn push_all(&mut self, parts: &[&[u8]]) -> Result<(), Overflow> {
        let adding = parts.iter().map(|p| p.len()).sum::<usize>();
        if adding > self.capacity - self.buf.len() {
            return Err(Overflow { queued: self.buf.len(), adding, capacity: self.capacity });
        }
        for p in parts {
            self.buf.extend_from_slice(p);
        }
        Ok(())
    }

    /// The bytes waiting to be sent.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Drops the first `n` bytes (they were sent).
    pub fn consume(&mut self, n: usize) {
        self.buf.drain(..n.min(self.buf.len()));
        if self.buf.is_empty() && self.buf.capacity() > 4096 {
            // Give a large reply's memory back.
            self.buf = Vec::new();
        }
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// The capacity.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Empties the buffer and frees its memory.
    pub fn clear(&mut self) {
        self.buf = Vec::new();
    }
}

/// What [`LineReader::feed`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LineEvent {
    /// A complete line without its `\n` (and without a trailing `\r`); never blank.
    Line(Vec<u8>),
    /// The line grew past the limit; `len` is its length so far. The reader is empty again.
    TooLarge {
        /// Bytes of the line received.
        len: usize,
    },
}

/// Splits a byte stream into lines of at most `max` bytes, one line at a time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LineReader {
    line: Vec<u8>,
    max: usize,
}

impl LineReader {
    /// A reader for lines of at most `max` bytes.
    pub fn new(max: usize) -> Self {
        Self { line: Vec::new(), max }
    }

    /// Takes bytes up to and including the first complete line (blank lines are skipped) or
    /// until the line is too long. Returns how many bytes of `bytes` it took and what it found.
    pub fn feed(&mut self, bytes: &[u8]) -> (usize, Option<LineEvent>) {
        for (i, &b) in bytes.iter().enumerate() {
            if b == b'\n' {
                let mut line = core::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return (i + 1, Some(LineEvent::Line(line)));
            }
            if self.line.len() >= self.max {
                let len = self.line.len() + 1;
                self.line = Vec::new();
                return (i + 1, Some(LineEvent::TooLarge { len }));
            }
            self.line.push(b);
        }
        (bytes.len(), None)
    }

    /// Whether part of a line has arrived (a request is in progress).
    pub fn in_request(&self) -> bool {
        !self.line.is_empty()
    }

    /// At the end of the stream (the peer half-closed): the unterminated last line, if it is not
    /// blank.
    pub fn finish(&mut self) -> Option<Vec<u8>> {
        let mut line = core::mem::take(&mut self.line);
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        (!line.iter().all(u8::is_ascii_whitespace)).then_some(line)
    }

    /// Forgets any partial line and frees its memory.
    pub fn clear(&mut self) {
        self.line = Vec::new();
    }
}

/// One connection's clocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timers {
    /// When the connection was accepted.
    pub opened_at: u64,
    /// Last time the peer sent bytes or took output.
    pub last_activity: u64,
    /// When the request in progress started (its first byte), if one is.
    pub request_since: Option<u64>,
    /// Last time queued output made progress (or became pending).
    pub output_progress: u64,
    /// Whether output is queued (in the buffer or the socket).
    pub output_pending: bool,
}

impl Timers {
    /// Clocks of a connection accepted at `now`.
    pub fn open(now: u64) -> Self {
        Self { opened_at: now, last_activity: now, request_since: None, output_progress: now, output_pending: false }
    }

    /// The peer sent bytes; `in_request` says whether an incomplete request is now buffered.
    pub fn on_input(&mut self, now: u64, in_request: bool) {
        self.last_activity = now;
        self.on_request_state(now, in_request);
    }

    /// Whether an incomplete request is buffered (without new input, e.g. after a reply).
    pub fn on_request_state(&mut self, now: u64, in_request: bool) {
        match (in_request, self.request_since) {
            (true, None) => self.request_since = Some(now),
            (false, Some(_)) => self.request_since = None,
            _ => {}
        }
    }

    /// Output state after a send attempt: `pending` bytes still queued, `progressed` when some
    /// left (into the socket, or acknowledged by the peer).
    pub fn on_output(&mut self, now: u64, pending: bool, progressed: bool) {
        if progressed {
            self.last_activity = now;
        }
        if pending && (progressed || !self.output_pending) {
            self.output_progress = now;
        }
        self.output_pending = pending;
    }

    /// The limit this connection has run into at `now`, if any.
    pub fn expired(&self, now: u64, limits: &Limits) -> Option<Expiry> {
        if self.output_pending && now >= self.output_progress + limits.write_stall_ms {
            return Some(Expiry::NotReading);
        }
        if let Some(since) = self.request_since {
            if now >= since + limits.request_deadline_ms {
                return Some(Expiry::RequestDeadline);
            }
        } else if !self.output_pending && now >= self.last_activity + limits.idle_timeout_ms {
            return Some(Expiry::Idle);
        }
        None
    }

    /// When the next limit can expire (for a `poll_timeout`).
    pub fn next_deadline(&self, limits: &Limits) -> u64 {
        let mut at = u64::MAX;
        if self.output_pending {
            at = at.min(self.output_progress + limits.write_stall_ms);
        }
        match self.request_since {
            Some(since) => at = at.min(since + limits.request_deadline_ms),
            None if !self.output_pending => at = at.min(self.last_activity + limits.idle_timeout_ms),
            None => {}
        }
        at
    }

    /// How evictable this connection is at `now` (lower first), or `None` when it must stay:
    /// `done` connections (answered, only waiting for the peer to close) first, then idle ones
    /// (nothing in progress, quiet for at least the grace), oldest first, then requests slower
    /// than the grace, oldest first. A connection with output in flight is left to the
    /// write-stall limit.
    pub fn evict_rank(&self, now: u64, limits: &Limits, done: bool) -> Option<(u8, u64)> {
        if done {
            return Some((0, self.last_activity));
        }
        if self.output_pending {
            return None;
        }
        match self.request_since {
            None if now >= self.last_activity + limits.evict_grace_ms => Some((1, self.last_activity)),
            Some(since) if now >= since + limits.evict_grace_ms => Some((2, since)),
            _ => None,
        }
    }
}

/// The connection to evict among `(index, rank)` pairs: the lowest rank (see
/// [`Timers::evict_rank`]); `None` when no connection may be evicted.
pub fn choose_victim(ranks: impl IntoIterator<Item = (usize, Option<(u8, u64)>)>) -> Option<usize> {
    ranks.into_iter().filter_map(|(i, r)| r.map(|r| (r, i))).min().map(|(_, i)| i)
}

#[cfg(test)]
mod tests {
    use super::*;

    const L: Limits = Limits {
        slots: 4,
        spare_listeners: 1,
        max_request: 8,
        out_capacity: 16,
        out_high_water: 8,
        request_deadline_ms: 5_000,
        idle_timeout_ms: 30_000,
        write_stall_ms: 4_000,
        linger_ms: 2_000,
        evict_grace_ms: 1_000,
        requests_per_poll: 4,
        read_budget: 1024,
    };

    #[test]
    fn out_buf_refuses_what_does_not_fit() {
        let mut b = OutBuf::new(16);
        b.push(b"0123456789").unwrap();
        let e = b.push(b"0123456789").unwrap_err();
        assert_eq!(e, Overflow { queued: 10, adding: 10, capacity: 16 });
        assert!(e.to_string().contains("expected at most 16"));
        assert_eq!(b.len(), 10, "nothing of a refused push is queued");
        assert!(b.push_all(&[b"abc", b"defg"]).is_err());
        b.push_all(&[b"abc", b"def"]).unwrap();
        assert_eq!(b.pending(), b"0123456789abcdef");
        b.consume(12);
        assert_eq!(b.pending(), b"cdef");
        b.consume(100);
        assert!(b.is_empty());
    }

    #[test]
    fn out_buf_never_grows_past_capacity_whatever_is_pushed() {
        let mut b = OutBuf::new(1000);
        let mut refused = 0;
        for i in 0..100_000usize {
            if b.push(&[b'x'; 37][..i % 37]).is_err() {
                refused += 1;
            }
            assert!(b.len() <= 1000);
        }
        assert!(refused > 0);
    }

    #[test]
    fn lines_are_split_one_at_a_time() {
        let mut r = LineReader::new(8);
        let input = b"\n\r\n  \nab\r\ncd\nef";
        let (n, ev) = r.feed(input);
        assert_eq!(ev, Some(LineEvent::Line(b"ab".to_vec())));
        let (m, ev) = r.feed(&input[n..]);
        assert_eq!(ev, Some(LineEvent::Line(b"cd".to_vec())));
        let (k, ev) = r.feed(&input[n + m..]);
        assert_eq!((k, ev), (2, None));
        assert!(r.in_request());
        assert_eq!(r.finish(), Some(b"ef".to_vec()));
        assert!(!r.in_request());
        r.feed(b"  \r");
        assert_eq!(r.finish(), None, "a blank unterminated line is no request");
    }

    #[test]
    fn long_lines_stop_at_the_limit() {
        let mut r = LineReader::new(8);
        let (n, ev) = r.feed(&[b'x'; 100]);
        assert_eq!((n, ev), (9, Some(LineEvent::TooLarge { len: 9 })));
        assert!(!r.in_request());
        let (_, ev) = r.feed(b"12345678\n");
        assert_eq!(ev, Some(LineEvent::Line(b"12345678".to_vec())), "exactly the limit is fine");
    }

    #[test]
    fn a_request_must_complete_within_its_deadline() {
        let mut t = Timers::open(0);
        t.on_input(100, true);
        t.on_input(4_000, true);
        assert_eq!(t.expired(5_099, &L), None);
        assert_eq!(t.expired(5_100, &L), Some(Expiry::RequestDeadline), "trickling bytes does not extend it");
        assert_eq!(t.next_deadline(&L), 5_100);
        t.on_input(5_000, false);
        assert_eq!(t.expired(5_100, &L), None);
    }

    #[test]
    fn idle_connections_time_out_once() {
        let mut t = Timers::open(0);
        assert_eq!(t.expired(29_999, &L), None);
        assert_eq!(t.expired(30_000, &L), Some(Expiry::Idle));
        t.on_input(20_000, false);
        assert_eq!(t.expired(30_000, &L), None);
        assert_eq!(t.next_deadline(&L), 50_000);
    }

    #[test]
    fn output_that_does_not_move_means_the_peer_is_not_reading() {
        let mut t = Timers::open(0);
        t.on_output(1_000, true, false);
        assert_eq!(t.expired(4_999, &L), None);
        t.on_output(4_000, true, true);
        assert_eq!(t.expired(7_999, &L), None);
        t.on_output(6_000, true, false);
        assert_eq!(t.expired(8_000, &L), Some(Expiry::NotReading));
        t.on_output(8_000, false, true);
        assert_eq!(t.expired(8_000, &L), None);
        // Pending output is not idleness.
        t.on_output(9_000, true, false);
        assert_eq!(t.expired(12_999, &L), None);
    }

    #[test]
    fn eviction_prefers_done_then_oldest_idle_then_oldest_slow() {
        let now = 10_000;
        let mut idle_old = Timers::open(1_000);
        idle_old.on_input(2_000, false);
        let idle_new = Timers::open(3_000);
        let fresh = Timers::open(9_500);
        let mut slow = Timers::open(0);
        slow.on_input(500, true);
        let mut sending = Timers::open(0);
        sending.on_output(100, true, false);
        assert_eq!(fresh.evict_rank(now, &L, false), None, "within the grace");
        assert_eq!(sending.evict_rank(now, &L, false), None, "left to the stall limit");
        let ranks = [
            (0, slow.evict_rank(now, &L, false)),
            (1, idle_new.evict_rank(now, &L, false)),
            (2, idle_old.evict_rank(now, &L, false)),
            (3, fresh.evict_rank(now, &L, false)),
            (4, sending.evict_rank(now, &L, false)),
        ];
        assert_eq!(choose_victim(ranks), Some(2));
        assert_eq!(choose_victim([(0, slow.evict_rank(now, &L, false)), (3, None)]), Some(0));
        assert_eq!(
            choose_victim([(5, idle_old.evict_rank(now, &L, true)), (2, idle_old.evict_rank(now, &L, false))]),
            Some(5)
        );
        assert_eq!(choose_victim([(3, None), (4, None)]), None);
    }

    proptest::proptest! {
        /// Whatever the bytes and however they are cut, the reader never holds more than its
        /// limit and returns every byte of every complete line.
        #[test]
        fn reader_is_bounded_and_lossless(bytes in proptest::collection::vec(proptest::sample::select(b"ab \r\n".to_vec()), 0..400), cut in 1usize..50) {
            let mut r = LineReader::new(16);
            let mut lines = Vec::new();
            for chunk in bytes.chunks(cut) {
                let mut rest = chunk;
                while !rest.is_empty() {
                    let (n, ev) = r.feed(rest);
                    proptest::prop_assert!(n > 0 && r.line.len() <= 16);
                    if let Some(LineEvent::Line(l)) = ev { lines.push(l) }
                    rest = &rest[n..];
                }
            }
            for l in &lines {
                proptest::prop_assert!(!l.contains(&b'\n') && l.len() <= 16);
            }
        }
    }
}
