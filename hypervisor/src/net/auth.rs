//! Access control of the management plane: the management token, the per-source rate limiter
//! for bad tokens, and the one check both servers (JSON API and metrics) make.
//!
//! - The token comes from the multiboot2 module `mgmt-token` (its file content; `cargo xtask
//!   image` writes 32 random bytes, hex-encoded). Only its SHA-256 is kept; a presented token is
//!   hashed and the digests are compared in constant time ([`subtle`]), so neither the content nor
//!   the length of the token leaks through timing.
//! - Mutating commands (`set`, `checkpoint`, `failover`, `shutdown`, and `auth` itself) always
//!   need the token; read-only ones (`status`, `stats`, `tunables`, `/metrics`) need it only with
//!   `mgmt_open=none`. Without a token module, what needs the token is refused
//!   ([`Denied::NoTokenConfigured`]).
//! - Missing or wrong tokens are [`Denied::Unauthorized`] and count against the source address
//!   in a [`RateLimiter`] of fixed size: after [`FREE_FAILURES`] failures a source is blocked for
//!   1 s, doubling with each further failure up to 60 s; while blocked it gets
//!   [`Denied::RateLimited`] without any token check.
//!
//! Pure logic, host-tested; the transport (`net::iface`) supplies the peer address and the time.
#![deny(unsafe_code)]

use core::fmt;
use core::net::Ipv4Addr;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::MgmtOpen;

/// The name of the multiboot2 module that holds the token.
pub const TOKEN_MODULE: &str = "mgmt-token";
/// The shortest token accepted, in bytes (`cargo xtask image` writes 64).
pub const MIN_TOKEN_BYTES: usize = 16;
/// The longest token accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 256;

/// The management token. Holds only its SHA-256; `Debug` prints nothing of it.
#[derive(Clone)]
pub struct MgmtToken {
    digest: [u8; 32],
}

impl fmt::Debug for MgmtToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MgmtToken(<redacted>)")
    }
}

/// Why the content of the `mgmt-token` module is not a token. Names positions and lengths,
/// never the content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenError {
    /// Fewer than [`MIN_TOKEN_BYTES`] bytes (after trailing whitespace).
    TooShort {
        /// Its length.
        len: usize,
    },
    /// More than [`MAX_TOKEN_BYTES`] bytes.
    TooLong {
        /// Its length.
        len: usize,
    },
    /// A byte outside the token68 alphabet of RFC 9110 §11.2 (`A-Z a-z 0-9 - . _ ~ + /`,
    /// then `=` padding), which a JSON string and an `Authorization: Bearer` header both carry
    /// as is.
    BadByte {
        /// Its offset.
        at: usize,
    },
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooShort { len } => write!(
                f,
                "module `{TOKEN_MODULE}` holds a token of {len} bytes; expected {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES} (e.g. 32 random bytes, hex-encoded)"
            ),
            Self::TooLong { len } => write!(
                f,
                "module `{TOKEN_MODULE}` holds a token of {len} bytes; expected {MIN_TOKEN_BYTES} to {MAX_TOKEN_BYTES}"
            ),
            Self::BadByte { at } => write!(
                f,
                "module `{TOKEN_MODULE}` has a byte at offset {at} outside A-Z a-z 0-9 - . _ ~ + / (and trailing =); expected e.g. hex"
            ),
        }
    }
}

fn is_token68(bytes: &[u8]) -> Result<(), usize> {
    let body = bytes.iter().position(|&b| b == b'=').unwrap_or(bytes.len());
    if let Some(at) = bytes[..body].iter().position(|&b| !(b.is_ascii_alphanumeric() || b"-._~+/".contains(&b))) {
        return Err(at);
    }
    if let Some(at) = bytes[body..].iter().position(|&b| b != b'=') {
        return Err(body + at);
    }
    if body == 0 {
        return Err(0);
    }
    Ok(())
}

impl MgmtToken {
    /// The token in a module's content: trailing whitespace (a newline) is dropped, the rest
    /// must be 16 to 256 bytes of token68.
    pub fn from_module(content: &[u8]) -> Result<Self, TokenError> {
        let token = content.trim_ascii_end();
        if token.len() < MIN_TOKEN_BYTES {
            return Err(TokenError::TooShort { len: token.len() });
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLong { len: token.len() });
        }
        is_token68(token).map_err(|at| TokenError::BadByte { at })?;
        Ok(Self { digest: Sha256::digest(token).into() })
    }

    /// Whether `presented` is the token. Constant time in the content of both (the digests of
    /// both are compared with `subtle`); hashing takes time in proportion to `presented` only.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(presented).into();
        bool::from(digest.ct_eq(&self.digest))
    }
}

/// Sources remembered by the rate limiter (a fixed table; the least recently failing entry is
/// reused when it is full).
pub const LIMITER_SLOTS: usize = 64;
/// Failures a source may make before it is blocked.
pub const FREE_FAILURES: u32 = 3;
/// The first block, ms; each further failure doubles it.
pub const BASE_BLOCK_MS: u64 = 1_000;
/// The longest block, ms.
pub const MAX_BLOCK_MS: u64 = 60_000;
/// A source with no failure for this long starts over.
pub const FORGET_MS: u64 = 600_000;

#[derive(Clone, Copy, Debug)]
struct Entry {
    addr: Ipv4Addr,
    failures: u32,
    last_ms: u64,
    blocked_until: u64,
}

/// Recent token failures per IPv4 source, with exponential back-off. Fixed memory
/// ([`LIMITER_SLOTS`] entries): nothing a client sends makes it grow.
#[derive(Clone, Debug)]
pub struct RateLimiter {
    entries: [Option<Entry>; LIMITER_SLOTS],
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new()
    }
}

impl RateLimiter {
    /// An empty table.
    pub const fn new() -> Self {
        Self { entries: [None; LIMITER_SLOTS] }
    }

    fn find(&self, addr: Ipv4Addr) -> Option<usize> {
        self.entries.iter().position(|e| e.is_some_and(|e| e.addr == addr))
    }

    /// If `addr` is blocked at `now_ms`: the ms left.
    pub fn blocked(&self, addr: Ipv4Addr, now_ms: u64) -> Option<u64> {
        let e = self.entries[self.find(addr)?]?;
        (now_ms < e.blocked_until).then(|| e.blocked_until - now_ms)
    }

    /// Records a failure of `addr`; returns the block it now has, if any.
    pub fn record_failure(&mut self, addr: Ipv4Addr, now_ms: u64) -> Option<u64> {
        let index = match self.find(addr) {
            Some(i) => i,
            None => {
                // A free slot, else the entry whose last failure is oldest, preferring entries
                // that are not blocked now.
                let i = self.entries.iter().position(Option::is_none).unwrap_or_else(|| {
                    let mut best = 0;
                    let mut best_key = (true, u64::MAX);
                    for (i, e) in self.entries.iter().enumerate() {
                        if let Some(e) = e {
                            let key = (now_ms < e.blocked_until, e.last_ms);
                            if key < best_key {
                                best_key = key;
                                best = i;
                            }
                        }
                    }
                    best
                });
                self.entries[i] = Some(Entry { addr, failures: 0, last_ms: now_ms, blocked_until: 0 });
                i
            }
        };
        let e = self.entries[index].as_mut()?;
        if now_ms.saturating_sub(e.last_ms) >= FORGET_MS {
            e.failures = 0;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_ms = now_ms;
        if e.failures > FREE_FAILURES {
            let doublings = (e.failures - FREE_FAILURES - 1).min(16);
            let block = (BASE_BLOCK_MS << doublings).min(MAX_BLOCK_MS);
            e.blocked_until = now_ms + block;
            Some(block)
        } else {
            None
        }
    }

    /// `addr` presented the right token: it starts over.
    pub fn record_success(&mut self, addr: Ipv4Addr) {
        if let Some(i) = self.find(addr) {
            self.entries[i] = None;
        }
    }

    /// Sources in the table.
    pub fn tracked(&self) -> usize {
        self.entries.iter().filter(|e| e.is_some()).count()
    }

    /// Sources blocked at `now_ms`.
    pub fn blocked_sources(&self, now_ms: u64) -> usize {
        self.entries.iter().filter(|e| e.is_some_and(|e| now_ms < e.blocked_until)).count()
    }
}

/// Why a request that needs the token was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denied {
    /// No `mgmt-token` module was given: nothing that needs the token is served.
    NoTokenConfigured,
    /// The token is missing (`presented: false`) or wrong.
    Unauthorized {
        /// Whether a token was presented at all.
        presented: bool,
    },
    /// The source failed too often; no token was checked.
    RateLimited {
        /// How long the block lasts from now, ms.
        retry_after_ms: u64,
    },
}

impl Denied {
    /// The short code sent in `"error"`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NoTokenConfigured => "no_token_configured",
            Self::Unauthorized { .. } => "unauthorized",
            Self::RateLimited { .. } => "rate_limited",
        }
    }
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoTokenConfigured => write!(
                f,
                "this command needs the management token, and this host was booted without a `{TOKEN_MODULE}` module; expected the module (see `cargo xtask image`)"
            ),
            Self::Unauthorized { presented: false } => write!(
                f,
                "this command needs the management token; expected a \"token\" member (or an earlier `auth` on this connection)"
            ),
            Self::Unauthorized { presented: true } => {
                write!(f, "the token does not match this host's management token")
            }
            Self::RateLimited { retry_after_ms } => write!(
                f,
                "too many bad tokens from this address; no token is checked for another {retry_after_ms} ms"
            ),
        }
    }
}

/// The access policy of one host and its rate limiter (one for both servers).
#[derive(Clone, Debug)]
pub struct Gate {
    token: Option<MgmtToken>,
    open: MgmtOpen,
    limiter: RateLimiter,
}

impl Gate {
    /// A gate for `token` (from the `mgmt-token` module, if any) and `mgmt_open=`.
    pub fn new(token: Option<MgmtToken>, open: MgmtOpen) -> Self {
        Self { token, open, limiter: RateLimiter::new() }
    }

    /// Whether a token is configured.
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Whether read-only requests need the token too (`mgmt_open=none`).
    pub fn reads_need_token(&self) -> bool {
        self.open == MgmtOpen::None
    }

    /// The rate limiter (for tests and gauges).
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Checks a request that needs the token, from `peer` at `now_ms`, carrying `presented` (or
    /// on a connection that earlier passed `auth`, `authenticated`). Order: no token configured;
    /// an authenticated connection without a token of its own; a blocked source (no token
    /// check); the token.
    pub fn check(
        &mut self,
        peer: Ipv4Addr,
        now_ms: u64,
        presented: Option<&[u8]>,
        authenticated: bool,
    ) -> Result<(), Denied> {
        let Some(token) = &self.token else {
            return Err(Denied::NoTokenConfigured);
        };
        if presented.is_none() && authenticated {
            return Ok(());
        }
        if let Some(retry_after_ms) = self.limiter.blocked(peer, now_ms) {
            return Err(Denied::RateLimited { retry_after_ms });
        }
        match presented {
            Some(t) if token.matches(t) => {
                self.limiter.record_success(peer);
                Ok(())
            }
            _ => {
                self.limiter.record_failure(peer, now_ms);
                Err(Denied::Unauthorized { presented: presented.is_some() })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    const TOKEN: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn gate(open: MgmtOpen) -> Gate {
        Gate::new(Some(MgmtToken::from_module(TOKEN).unwrap()), open)
    }

    const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    #[test]
    fn token_module_content_is_checked_by_name_without_echoing_it() {
        assert!(MgmtToken::from_module(b"0123456789abcdef0123456789abcdef\n").unwrap().matches(TOKEN));
        assert!(MgmtToken::from_module(b"QUJDREVGR0hJSktMTU5PUA==").is_ok(), "base64 with padding");
        assert_eq!(MgmtToken::from_module(b"short\n").unwrap_err(), TokenError::TooShort { len: 5 });
        assert_eq!(MgmtToken::from_module(b"").unwrap_err(), TokenError::TooShort { len: 0 });
        let long = [b'a'; MAX_TOKEN_BYTES + 1];
        assert_eq!(MgmtToken::from_module(&long).unwrap_err(), TokenError::TooLong { len: 257 });
        let err = MgmtToken::from_module(b"secretsecret\"secretsecret").unwrap_err();
        assert_eq!(err, TokenError::BadByte { at: 12 });
        assert!(!err.to_string().contains("secret"), "{err}");
        assert_eq!(MgmtToken::from_module(b"abcdefghijklmnop=q").unwrap_err(), TokenError::BadByte { at: 17 });
        assert_eq!(MgmtToken::from_module(b"================").unwrap_err(), TokenError::BadByte { at: 0 });
        assert_eq!(MgmtToken::from_module(b" 0123456789abcdef").unwrap_err(), TokenError::BadByte { at: 0 });
        let token = MgmtToken::from_module(TOKEN).unwrap();
        assert!(!std::format!("{token:?}").contains("0123"));
    }

    #[test]
    fn the_token_matches_only_itself() {
        let token = MgmtToken::from_module(TOKEN).unwrap();
        assert!(token.matches(TOKEN));
        assert!(!token.matches(b"0123456789abcdef0123456789abcdeF"));
        assert!(!token.matches(b"0123456789abcdef0123456789abcde"));
        assert!(!token.matches(b"0123456789abcdef0123456789abcdef0"));
        assert!(!token.matches(b""));
    }

    #[test]
    fn without_a_token_nothing_that_needs_one_is_served() {
        let mut g = Gate::new(None, MgmtOpen::Read);
        assert_eq!(g.check(A, 0, Some(TOKEN), false), Err(Denied::NoTokenConfigured));
        assert_eq!(g.check(A, 0, None, true), Err(Denied::NoTokenConfigured));
        assert_eq!(g.limiter().tracked(), 0, "nothing to guess, nothing counted");
    }

    #[test]
    fn right_token_or_authenticated_connection_passes() {
        let mut g = gate(MgmtOpen::Read);
        assert!(!g.reads_need_token());
        assert!(gate(MgmtOpen::None).reads_need_token());
        assert_eq!(g.check(A, 0, Some(TOKEN), false), Ok(()));
        assert_eq!(g.check(A, 0, None, true), Ok(()));
        assert_eq!(g.check(A, 0, None, false), Err(Denied::Unauthorized { presented: false }));
        assert_eq!(g.check(A, 0, Some(b"nope"), true), Err(Denied::Unauthorized { presented: true }));
    }

    #[test]
    fn repeated_failures_block_one_source_with_back_off_and_not_another() {
        let mut g = gate(MgmtOpen::Read);
        for i in 0..FREE_FAILURES {
            assert_eq!(g.check(A, i as u64, Some(b"bad"), false), Err(Denied::Unauthorized { presented: true }));
        }
        // The fourth failure blocks for 1 s.
        assert_eq!(g.check(A, 10, None, false), Err(Denied::Unauthorized { presented: false }));
        // While blocked, even the right token is not checked.
        assert_eq!(g.check(A, 20, Some(TOKEN), false), Err(Denied::RateLimited { retry_after_ms: 990 }));
        // Another source is served.
        assert_eq!(g.check(B, 20, Some(TOKEN), false), Ok(()));
        assert_eq!(g.limiter().blocked_sources(20), 1);
        // After the block, the next failure blocks for 2 s, then 4 s, ... up to 60 s.
        assert_eq!(g.check(A, 1010, Some(b"bad"), false), Err(Denied::Unauthorized { presented: true }));
        assert_eq!(g.check(A, 1011, Some(TOKEN), false), Err(Denied::RateLimited { retry_after_ms: 1999 }));
        let mut now = 3010;
        let mut last = 0;
        for _ in 0..20 {
            g.check(A, now, Some(b"bad"), false).unwrap_err();
            last = g.limiter().blocked(A, now).unwrap();
            now += last;
        }
        assert_eq!(last, MAX_BLOCK_MS);
        // The right token after the block: served, and the source starts over.
        assert_eq!(g.check(A, now, Some(TOKEN), false), Ok(()));
        assert_eq!(g.limiter().tracked(), 0);
        assert_eq!(g.check(A, now, Some(b"bad"), false), Err(Denied::Unauthorized { presented: true }));
        assert_eq!(g.limiter().blocked(A, now), None);
    }

    #[test]
    fn an_authenticated_connection_is_not_rate_limited() {
        let mut g = gate(MgmtOpen::Read);
        for t in 0..10 {
            let _ = g.check(A, t, Some(b"bad"), false);
        }
        assert!(matches!(g.check(A, 10, Some(TOKEN), false), Err(Denied::RateLimited { .. })));
        assert_eq!(g.check(A, 10, None, true), Ok(()));
    }

    #[test]
    fn failures_are_forgotten_after_a_quiet_period() {
        let mut l = RateLimiter::new();
        for _ in 0..FREE_FAILURES {
            assert_eq!(l.record_failure(A, 0), None);
        }
        assert_eq!(l.record_failure(A, FORGET_MS), None, "a fresh start after FORGET_MS");
    }

    #[test]
    fn the_table_never_grows_and_keeps_blocked_sources() {
        let mut l = RateLimiter::new();
        // Block A.
        for t in 0..=u64::from(FREE_FAILURES) {
            l.record_failure(A, t);
        }
        assert!(l.blocked(A, 10).is_some());
        // Many other sources fail once each: the table stays at its size, A stays blocked.
        for i in 0..10_000u32 {
            let addr = Ipv4Addr::from(0x0b00_0000 + i);
            l.record_failure(addr, 10 + u64::from(i % 500));
            assert!(l.tracked() <= LIMITER_SLOTS);
        }
        assert_eq!(l.tracked(), LIMITER_SLOTS);
        assert!(l.blocked(A, 500).is_some(), "a blocked source is not pushed out by one-off failures");
        assert_eq!(core::mem::size_of::<RateLimiter>(), core::mem::size_of::<[Option<Entry>; LIMITER_SLOTS]>());
    }

    proptest::proptest! {
        /// Whatever sequence of sources, times and tokens: the table stays bounded, the right
        /// token from an unblocked source always passes, and a blocked source is never checked.
        #[test]
        fn gate_invariants(steps in proptest::collection::vec((0u8..80, 0u64..5_000, proptest::bool::ANY), 0..400)) {
            let mut g = gate(MgmtOpen::Read);
            let mut now = 0;
            for (src, dt, good) in steps {
                now += dt;
                let addr = Ipv4Addr::new(10, 1, 0, src);
                let blocked = g.limiter().blocked(addr, now);
                let presented: &[u8] = if good { TOKEN } else { b"wrong-token-wrong-token" };
                let result = g.check(addr, now, Some(presented), false);
                match blocked {
                    Some(ms) => proptest::prop_assert_eq!(result, Err(Denied::RateLimited { retry_after_ms: ms })),
                    None if good => proptest::prop_assert_eq!(result, Ok(())),
                    None => proptest::prop_assert_eq!(result, Err(Denied::Unauthorized { presented: true })),
                }
                proptest::prop_assert!(g.limiter().tracked() <= LIMITER_SLOTS);
            }
        }
    }
}
