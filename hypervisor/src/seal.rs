//! The replication link's security layer: mutual authentication with the cluster key and
//! authenticated encryption of every message (issue "Nobody gets in where they don't belong").
//!
//! Sans-IO, host-tested, between the TCP transport (`net::repl`) and the message codec
//! (`colo::link`). [`SecureChannel`] takes received bytes in and hands out plaintext; it seals
//! plaintext into records for the transport. It never buffers more than one record.
//!
//! # Handshake (three messages, both sides prove they hold the cluster key)
//! 1. initiator (primary) → responder: `Hello1 { magic, host id, nonce_i }`
//! 2. responder → initiator: `Hello2 { host id, nonce_r, HMAC(K, "COLO-r" ‖ transcript) }`
//! 3. initiator → responder: `Finish { HMAC(K, "COLO-i" ‖ transcript) }`
//!
//! where the transcript is message 1 and the id and nonce of message 2. Each side checks the
//! other's MAC (in constant time), so a host without the key learns nothing and gets nowhere;
//! fresh nonces on both sides make every session's keys new, so nothing recorded from an
//! earlier session can be replayed into this one. Session keys come from HKDF-SHA256 over the
//! cluster key, salted with both nonces and bound to both host ids, one key per direction.
//!
//! # Records
//! `length (u32 BE) ‖ ChaCha20-Poly1305(ciphertext ‖ tag)`, the length as associated data, the
//! nonce a per-direction counter that is never sent: a replayed, reordered, dropped, altered or
//! truncated record fails authentication by name ([`SealError::RecordRejected`]). The driver
//! closes the connection on any error; nothing that failed reaches the codec, let alone a VM.
#![deny(unsafe_code)]

use alloc::vec::Vec;
use core::fmt;

use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce, Tag};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The cluster key's length.
pub const KEY_LEN: usize = 32;
/// Handshake nonce length.
pub const NONCE_LEN: usize = 32;
/// Largest plaintext in one record.
pub const MAX_RECORD_PLAINTEXT: usize = 256 * 1024;
const TAG_LEN: usize = 16;
const MAGIC: &[u8; 8] = b"COLOSEC1";
const HELLO1_LEN: usize = 8 + 8 + NONCE_LEN;
const HELLO2_LEN: usize = 8 + NONCE_LEN + 32;
const FINISH_LEN: usize = 32;

/// The cluster key (a multiboot2 module `cluster-key`). Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct ClusterKey([u8; KEY_LEN]);

impl ClusterKey {
    /// A key from exactly [`KEY_LEN`] bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SealError> {
        let key: [u8; KEY_LEN] = bytes.try_into().map_err(|_| SealError::BadKeyLength(bytes.len()))?;
        Ok(Self(key))
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<32 bytes, not shown>)")
    }
}

/// Which side of the handshake this host is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealRole {
    /// Opens the connection and speaks first (the primary).
    Initiator,
    /// Accepts it (the secondary).
    Responder,
}

/// Why the channel refused something. Each is counted by name and closes the connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SealError {
    /// A cluster key that is not 32 bytes.
    BadKeyLength(usize),
    /// The first message does not start with the protocol magic: not a COLO host, or another
    /// version.
    BadMagic,
    /// The peer's handshake MAC does not verify: it does not hold this cluster's key.
    WrongKey,
    /// The peer claims this host's own id.
    SameHostId(u64),
    /// A record length of zero or above [`MAX_RECORD_PLAINTEXT`].
    BadRecordLength(u32),
    /// A record failed authentication: altered, replayed, reordered or from another session.
    RecordRejected {
        /// The record counter expected.
        counter: u64,
    },
    /// Plaintext to seal before the handshake finished, or above [`MAX_RECORD_PLAINTEXT`].
    NotReady,
    /// The record counter would wrap (2^64 records): the session must be renewed.
    CounterExhausted,
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadKeyLength(n) => write!(f, "cluster key of {n} bytes; expected {KEY_LEN}"),
            Self::BadMagic => write!(f, "peer did not open with `COLOSEC1`: not a COLO link of this version"),
            Self::WrongKey => write!(f, "peer's handshake MAC does not verify: it holds another cluster key"),
            Self::SameHostId(id) => write!(f, "peer claims this host's own id {id}"),
            Self::BadRecordLength(n) => write!(f, "record length {n}; expected 1..={MAX_RECORD_PLAINTEXT}"),
            Self::RecordRejected { counter } => {
                write!(f, "record {counter} failed authentication (altered, replayed, reordered or foreign)")
            }
            Self::NotReady => write!(f, "nothing can be sealed before the handshake completes"),
            Self::CounterExhausted => write!(f, "record counter exhausted; reconnect"),
        }
    }
}

impl SealError {
    /// A short name for counters and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::BadKeyLength(_) => "bad_key_length",
            Self::BadMagic => "bad_magic",
            Self::WrongKey => "wrong_key",
            Self::SameHostId(_) => "same_host_id",
            Self::BadRecordLength(_) => "bad_record_length",
            Self::RecordRejected { .. } => "record_rejected",
            Self::NotReady => "not_ready",
            Self::CounterExhausted => "counter_exhausted",
        }
    }

    /// The replication link's counter for this error: [`Self::name`] with a `seal_` prefix.
    pub fn counter_name(&self) -> &'static str {
        match self {
            Self::BadKeyLength(_) => "seal_bad_key_length",
            Self::BadMagic => "seal_bad_magic",
            Self::WrongKey => "seal_wrong_key",
            Self::SameHostId(_) => "seal_same_host_id",
            Self::BadRecordLength(_) => "seal_bad_record_length",
            Self::RecordRejected { .. } => "seal_record_rejected",
            Self::NotReady => "seal_not_ready",
            Self::CounterExhausted => "seal_counter_exhausted",
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Stage {
    /// Initiator: sent Hello1, awaiting Hello2. Responder: awaiting Hello1.
    AwaitHello,
    /// Responder: sent Hello2, awaiting Finish.
    AwaitFinish,
    Established,
    /// An error happened: everything more is refused.
    Failed,
}

struct Direction {
    cipher: ChaCha20Poly1305,
    counter: u64,
}

impl Direction {
    fn nonce(&self) -> Nonce {
        let mut n = [0u8; 12];
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        n.into()
    }
}

/// One side of an authenticated, encrypted replication link.
pub struct SecureChannel {
    role: SealRole,
    key: ClusterKey,
    host_id: u64,
    nonce: [u8; NONCE_LEN],
    stage: Stage,
    /// Handshake bytes so far (message 1 and the id and nonce of message 2).
    transcript: Vec<u8>,
    /// Bytes received and not yet consumed: at most one record.
    pending: Vec<u8>,
    /// Handshake bytes waiting to be sent.
    outgoing: Vec<u8>,
    peer_host_id: Option<u64>,
    send: Option<Direction>,
    recv: Option<Direction>,
}

impl fmt::Debug for SecureChannel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecureChannel")
            .field("role", &self.role)
            .field("host_id", &self.host_id)
            .field("stage", &self.stage)
            .field("peer_host_id", &self.peer_host_id)
            .finish_non_exhaustive()
    }
}

type HmacSha256 = Hmac<Sha256>;

impl SecureChannel {
    /// A new session for `host_id`, with a fresh random `nonce` from the driver (never reused).
    /// The initiator's first message is ready in [`SecureChannel::take_outgoing`] at once.
    pub fn new(role: SealRole, key: ClusterKey, host_id: u64, nonce: [u8; NONCE_LEN]) -> Self {
        let mut channel = Self {
            role,
            key,
            host_id,
            nonce,
            stage: Stage::AwaitHello,
            transcript: Vec::new(),
            pending: Vec::new(),
            outgoing: Vec::new(),
            peer_host_id: None,
            send: None,
            recv: None,
        };
        if role == SealRole::Initiator {
            let mut hello = Vec::with_capacity(HELLO1_LEN);
            hello.extend_from_slice(MAGIC);
            hello.extend_from_slice(&host_id.to_be_bytes());
            hello.extend_from_slice(&nonce);
            channel.transcript.extend_from_slice(&hello);
            channel.outgoing = hello;
        }
        channel
    }

    /// Whether records can flow.
    pub fn is_established(&self) -> bool {
        self.stage == Stage::Established
    }

    /// The peer's host id, once its handshake verified.
    pub fn peer_host_id(&self) -> Option<u64> {
        self.peer_host_id.filter(|_| self.is_established())
    }

    /// Received bytes held for an incomplete record (or handshake message): a stream that ends
    /// with some was truncated.
    pub fn partial_bytes(&self) -> usize {
        self.pending.len()
    }

    /// Handshake bytes to send (empty when there are none).
    pub fn take_outgoing(&mut self) -> Vec<u8> {
        core::mem::take(&mut self.outgoing)
    }

    /// Feeds received bytes; every plaintext record they complete goes to `deliver`, in order.
    /// On error the channel is dead: the driver closes the connection.
    pub fn receive(&mut self, mut bytes: &[u8], mut deliver: impl FnMut(&[u8])) -> Result<(), SealError> {
        if self.stage == Stage::Failed {
            return Err(SealError::NotReady);
        }
        loop {
            // Re-evaluated after every piece: a record's length is known once its header is in.
            let need = self.bytes_wanted();
            if self.pending.len() < need {
                if bytes.is_empty() {
                    return Ok(());
                }
                let take = (need - self.pending.len()).min(bytes.len());
                self.pending.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                continue;
            }
            if let Err(e) = self.step(&mut deliver) {
                self.stage = Stage::Failed;
                self.pending = Vec::new();
                return Err(e);
            }
        }
    }

    /// How many buffered bytes the current step needs before it can proceed.
    fn bytes_wanted(&self) -> usize {
        match (&self.stage, self.role) {
            (Stage::AwaitHello, SealRole::Responder) => HELLO1_LEN,
            (Stage::AwaitHello, SealRole::Initiator) => HELLO2_LEN,
            (Stage::AwaitFinish, _) => FINISH_LEN,
            _ if self.pending.len() < 4 => 4,
            _ => {
                let len = u32::from_be_bytes(self.pending[..4].try_into().expect("4 bytes"));
                // An out-of-range length is refused as soon as its 4 bytes are in.
                if len == 0 || len as usize > MAX_RECORD_PLAINTEXT {
                    4
                } else {
                    4 + len as usize + TAG_LEN
                }
            }
        }
    }

    fn step(&mut self, deliver: &mut impl FnMut(&[u8])) -> Result<(), SealError> {
        match (&self.stage, self.role) {
            (Stage::AwaitHello, SealRole::Responder) => {
                let hello = core::mem::take(&mut self.pending);
                if &hello[..8] != MAGIC {
                    return Err(SealError::BadMagic);
                }
                let peer = u64::from_be_bytes(hello[8..16].try_into().expect("8 bytes"));
                if peer == self.host_id {
                    return Err(SealError::SameHostId(peer));
                }
                self.peer_host_id = Some(peer);
                self.transcript.extend_from_slice(&hello);
                self.transcript.extend_from_slice(&self.host_id.to_be_bytes());
                self.transcript.extend_from_slice(&self.nonce);
                let mac = self.mac(b"COLO-r");
                self.outgoing.extend_from_slice(&self.host_id.to_be_bytes());
                self.outgoing.extend_from_slice(&self.nonce);
                self.outgoing.extend_from_slice(&mac);
                self.stage = Stage::AwaitFinish;
            }
            (Stage::AwaitHello, SealRole::Initiator) => {
                let hello = core::mem::take(&mut self.pending);
                let peer = u64::from_be_bytes(hello[..8].try_into().expect("8 bytes"));
                if peer == self.host_id {
                    return Err(SealError::SameHostId(peer));
                }
                self.transcript.extend_from_slice(&hello[..8 + NONCE_LEN]);
                self.verify(b"COLO-r", &hello[8 + NONCE_LEN..])?;
                self.peer_host_id = Some(peer);
                let mac = self.mac(b"COLO-i");
                self.outgoing.extend_from_slice(&mac);
                self.establish();
            }
            (Stage::AwaitFinish, _) => {
                let finish = core::mem::take(&mut self.pending);
                self.verify(b"COLO-i", &finish)?;
                self.establish();
            }
            _ => {
                let len = u32::from_be_bytes(self.pending[..4].try_into().expect("4 bytes"));
                if len == 0 || len as usize > MAX_RECORD_PLAINTEXT {
                    return Err(SealError::BadRecordLength(len));
                }
                let mut record = core::mem::take(&mut self.pending);
                let recv = self.recv.as_mut().ok_or(SealError::NotReady)?;
                let counter = recv.counter;
                let (header, body) = record.split_at_mut(4);
                let (text, tag) = body.split_at_mut(len as usize);
                recv.cipher
                    .decrypt_in_place_detached(&recv.nonce(), header, text, Tag::from_slice(tag))
                    .map_err(|_| SealError::RecordRejected { counter })?;
                recv.counter = counter.checked_add(1).ok_or(SealError::CounterExhausted)?;
                deliver(text);
            }
        }
        Ok(())
    }

    /// Seals `plaintext` into one record appended to `out`.
    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), SealError> {
        if plaintext.is_empty() || plaintext.len() > MAX_RECORD_PLAINTEXT {
            return Err(SealError::BadRecordLength(plaintext.len() as u32));
        }
        let send = self.send.as_mut().filter(|_| self.stage == Stage::Established).ok_or(SealError::NotReady)?;
        let header = (plaintext.len() as u32).to_be_bytes();
        let start = out.len();
        out.extend_from_slice(&header);
        out.extend_from_slice(plaintext);
        let nonce = send.nonce();
        let tag = send
            .cipher
            .encrypt_in_place_detached(&nonce, &header, &mut out[start + 4..])
            .map_err(|_| SealError::BadRecordLength(plaintext.len() as u32))?;
        out.extend_from_slice(&tag);
        send.counter = send.counter.checked_add(1).ok_or(SealError::CounterExhausted)?;
        Ok(())
    }

    /// Bytes a record of `plaintext_len` takes on the wire.
    pub const fn record_len(plaintext_len: usize) -> usize {
        4 + plaintext_len + TAG_LEN
    }

    fn mac(&self, label: &[u8]) -> [u8; 32] {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key.0).expect("HMAC takes any key length");
        mac.update(label);
        mac.update(&self.transcript);
        mac.finalize().into_bytes().into()
    }

    fn verify(&self, label: &[u8], tag: &[u8]) -> Result<(), SealError> {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.key.0).expect("HMAC takes any key length");
        mac.update(label);
        mac.update(&self.transcript);
        mac.verify_slice(tag).map_err(|_| SealError::WrongKey)
    }

    /// Derives one key per direction from the cluster key, both nonces and both host ids.
    fn establish(&mut self) {
        let peer = self.peer_host_id.expect("peer id known before keys");
        let (initiator_id, responder_id) = match self.role {
            SealRole::Initiator => (self.host_id, peer),
            SealRole::Responder => (peer, self.host_id),
        };
        // The transcript holds both nonces and both ids in a fixed order.
        let hk = Hkdf::<Sha256>::new(Some(&self.transcript), &self.key.0);
        let mut okm = [0u8; 64];
        let mut info = Vec::with_capacity(32);
        info.extend_from_slice(b"colo link keys v1");
        info.extend_from_slice(&initiator_id.to_be_bytes());
        info.extend_from_slice(&responder_id.to_be_bytes());
        hk.expand(&info, &mut okm).expect("64 bytes is a valid HKDF-SHA256 length");
        let i2r = ChaCha20Poly1305::new(Key::from_slice(&okm[..32]));
        let r2i = ChaCha20Poly1305::new(Key::from_slice(&okm[32..]));
        let (send, recv) = match self.role {
            SealRole::Initiator => (i2r, r2i),
            SealRole::Responder => (r2i, i2r),
        };
        self.send = Some(Direction { cipher: send, counter: 0 });
        self.recv = Some(Direction { cipher: recv, counter: 0 });
        okm.fill(0);
        self.transcript = Vec::new();
        self.stage = Stage::Established;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ClusterKey {
        ClusterKey::from_bytes(&[b; KEY_LEN]).unwrap()
    }

    /// Runs the handshake between two channels; returns them, or the first error by side.
    fn pair(ki: ClusterKey, kr: ClusterKey) -> (SecureChannel, SecureChannel, Result<(), (char, SealError)>) {
        let mut i = SecureChannel::new(SealRole::Initiator, ki, 1, [0x11; NONCE_LEN]);
        let mut r = SecureChannel::new(SealRole::Responder, kr, 2, [0x22; NONCE_LEN]);
        let sink = |_: &[u8]| panic!("no plaintext during the handshake");
        for _ in 0..3 {
            let to_r = i.take_outgoing();
            if let Err(e) = r.receive(&to_r, sink) {
                return (i, r, Err(('r', e)));
            }
            let to_i = r.take_outgoing();
            if let Err(e) = i.receive(&to_i, sink) {
                return (i, r, Err(('i', e)));
            }
        }
        (i, r, Ok(()))
    }

    fn open(ch: &mut SecureChannel, wire: &[u8]) -> Result<Vec<Vec<u8>>, SealError> {
        let mut got = Vec::new();
        ch.receive(wire, |p| got.push(p.to_vec()))?;
        Ok(got)
    }

    #[test]
    fn handshake_then_records_both_ways_in_any_pieces() {
        let (mut i, mut r, res) = pair(key(7), key(7));
        res.unwrap();
        assert!(i.is_established() && r.is_established());
        assert_eq!((i.peer_host_id(), r.peer_host_id()), (Some(2), Some(1)));
        let mut wire = Vec::new();
        for msg in [&b"checkpoint page"[..], b"x", &[0xAB; 5000]] {
            i.seal(msg, &mut wire).unwrap();
        }
        let mut got = Vec::new();
        for piece in wire.chunks(7) {
            r.receive(piece, |p| got.push(p.to_vec())).unwrap();
        }
        assert_eq!(got, vec![b"checkpoint page".to_vec(), b"x".to_vec(), vec![0xAB; 5000]]);
        let mut back = Vec::new();
        r.seal(b"ack", &mut back).unwrap();
        assert_eq!(open(&mut i, &back).unwrap(), vec![b"ack".to_vec()]);
        assert!(!wire.windows(15).any(|w| w == b"checkpoint page"), "plaintext on the wire");
    }

    #[test]
    fn wrong_key_is_refused_by_name_on_both_sides() {
        let (_, _, res) = pair(key(1), key(2));
        assert_eq!(res, Err(('i', SealError::WrongKey)), "the initiator refuses the responder's MAC");
        // A responder facing an initiator that forges the finish refuses it too.
        let mut r = SecureChannel::new(SealRole::Responder, key(2), 2, [3; NONCE_LEN]);
        let mut hello = Vec::from(&MAGIC[..]);
        hello.extend_from_slice(&9u64.to_be_bytes());
        hello.extend_from_slice(&[4; NONCE_LEN]);
        r.receive(&hello, |_| {}).unwrap();
        assert_eq!(r.receive(&[0u8; FINISH_LEN], |_| {}), Err(SealError::WrongKey));
        assert!(!r.is_established());
        let mut out = Vec::new();
        assert_eq!(r.seal(b"secret", &mut out), Err(SealError::NotReady));
    }

    #[test]
    fn garbage_and_same_id_are_named() {
        let mut r = SecureChannel::new(SealRole::Responder, key(1), 2, [3; NONCE_LEN]);
        assert_eq!(r.receive(&[b'G'; HELLO1_LEN], |_| {}), Err(SealError::BadMagic));
        let mut r = SecureChannel::new(SealRole::Responder, key(1), 2, [3; NONCE_LEN]);
        let mut hello = Vec::from(&MAGIC[..]);
        hello.extend_from_slice(&2u64.to_be_bytes());
        hello.extend_from_slice(&[4; NONCE_LEN]);
        assert_eq!(r.receive(&hello, |_| {}), Err(SealError::SameHostId(2)));
    }

    #[test]
    fn flips_replays_reorders_and_bad_lengths_are_rejected() {
        let (mut i, r0, res) = pair(key(5), key(5));
        res.unwrap();
        drop(r0);
        let mut records = Vec::new();
        for n in 0..3u8 {
            let mut rec = Vec::new();
            i.seal(&[n; 100], &mut rec).unwrap();
            records.push(rec);
        }
        let fresh = || {
            let (_, r, res) = pair(key(5), key(5));
            res.unwrap();
            r
        };
        // Same nonces in `pair`, so a fresh responder expects exactly these records.
        let mut r = fresh();
        assert_eq!(open(&mut r, &records[0]).unwrap().len(), 1);
        // Replay.
        assert_eq!(open(&mut r, &records[0]), Err(SealError::RecordRejected { counter: 1 }));
        // Reorder.
        let mut r = fresh();
        assert_eq!(open(&mut r, &records[1]), Err(SealError::RecordRejected { counter: 0 }));
        // Every single bit flip anywhere in a record.
        for bit in 0..records[0].len() * 8 {
            let mut rec = records[0].clone();
            rec[bit / 8] ^= 1 << (bit % 8);
            let mut r = fresh();
            let result = open(&mut r, &rec);
            assert!(
                matches!(result, Err(SealError::RecordRejected { .. }) | Err(SealError::BadRecordLength(_)) | Ok(_)),
                "bit {bit}: {result:?}"
            );
            // A flip in the length may leave the record incomplete (waiting for more bytes),
            // but it never delivers anything.
            assert!(result.map_or(true, |got| got.is_empty()), "bit {bit} delivered plaintext");
        }
        // A dropped record: the next one fails.
        let mut r = fresh();
        assert_eq!(open(&mut r, &records[1]), Err(SealError::RecordRejected { counter: 0 }));
        // Out-of-range lengths are refused as soon as the header is in, without buffering.
        let mut r = fresh();
        assert_eq!(open(&mut r, &u32::MAX.to_be_bytes()), Err(SealError::BadRecordLength(u32::MAX)));
        let mut r = fresh();
        assert_eq!(open(&mut r, &0u32.to_be_bytes()), Err(SealError::BadRecordLength(0)));
    }

    #[test]
    fn sessions_differ_so_old_records_do_not_replay_into_new_ones() {
        let mut i1 = SecureChannel::new(SealRole::Initiator, key(5), 1, [0x31; NONCE_LEN]);
        let mut r1 = SecureChannel::new(SealRole::Responder, key(5), 2, [0x32; NONCE_LEN]);
        r1.receive(&i1.take_outgoing(), |_| {}).unwrap();
        i1.receive(&r1.take_outgoing(), |_| {}).unwrap();
        r1.receive(&i1.take_outgoing(), |_| {}).unwrap();
        let mut old = Vec::new();
        i1.seal(b"old session", &mut old).unwrap();
        let (_, mut r2, res) = pair(key(5), key(5));
        res.unwrap();
        assert_eq!(open(&mut r2, &old), Err(SealError::RecordRejected { counter: 0 }));
    }

    #[test]
    fn key_is_never_printed() {
        let k = key(0x5A);
        assert!(!format!("{k:?}").contains("5a") && !format!("{k:?}").contains("90"));
        assert_eq!(ClusterKey::from_bytes(&[0; 31]).err(), Some(SealError::BadKeyLength(31)));
    }
}
