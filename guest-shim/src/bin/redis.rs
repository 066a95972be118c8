//! `guest-redis`: the reference service. A RESP server on TCP port 6379 over the paravirtual
//! NIC (smoltcp with the determinism shim), enough of Redis for `redis-cli` and
//! `redis-benchmark`: PING, ECHO, GET, SET (NX/XX; EX/PX accepted and ignored: no expiry), DEL,
//! EXISTS, INCR/DECR/INCRBY/DECRBY, MGET, MSET, DBSIZE, FLUSHALL/FLUSHDB, TIME (from the guest
//! clock, so a PVM and an SVM answer differently, as a real service's replies would), plus the connection
//! chatter (CONFIG GET, COMMAND, CLIENT, SELECT, INFO, QUIT) and SHUTDOWN (persist and end the
//! guest). Many connections ([`SOCKETS`]), pipelined requests, inline commands; a malformed
//! request gets a RESP error and the connection stays open.
//!
//! Module line: `guest-redis ip=A.B.C.D/N mac=... [gw=A.B.C.D] [disk=NAME] [shim_*=off]`.
//!
//! Persistence: an append-only log on the block device, in a RAM mirror of the disk. Sector 0:
//! `COLORDB1`, the epoch (u32). From byte 512: records `[len u32][crc32 u32][payload]`, where the
//! CRC covers the epoch and the payload and payload = op (1 set, 2 del) + key length (u32) + key
//! (+ value length + value); a zero length ends the log. FLUSHALL and compaction start a new
//! epoch, so stale records after the end never replay. Writes reach the disk after each round of
//! requests, before their replies are sent.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::collections::BTreeMap;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write as _;

use guest_shim::netshim::{self, ShimConfig};
use guest_shim::pvblock::Disk;
use guest_shim::pvnet::PvNic;
use guest_shim::rt::{block_until, clock_now, ticks_per_second, Env};
use guest_shim::{guest_main, println};
use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, IpCidr, Ipv4Address, Ipv4Cidr};

guest_main!(main);

/// The Redis port.
const PORT: u16 = 6379;
/// Concurrent connections.
const SOCKETS: usize = 40;
const RX_BUFFER: usize = 16 * 1024;
const TX_BUFFER: usize = 32 * 1024;
/// Stop reading requests on a connection while this much output waits.
const OUT_HIGH_WATER: usize = 64 * 1024;
/// Largest bulk string accepted.
const MAX_BULK: i64 = 1 << 20;
/// Most arguments in one command.
const MAX_ARGS: i64 = 64 * 1024;
/// Largest inline command line.
const MAX_INLINE: usize = 64 * 1024;
/// Most bytes the disk mirror keeps.
const MAX_DISK: u64 = 64 << 20;
const SECTOR: usize = 512;
const MAGIC: &[u8; 8] = b"COLORDB1";
const OP_SET: u8 = 1;
const OP_DEL: u8 = 2;

fn parse_ipv4(text: &str) -> Option<Ipv4Address> {
    let mut octets = [0u8; 4];
    let mut parts = text.split('.');
    for o in &mut octets {
        *o = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Address::new(octets[0], octets[1], octets[2], octets[3]))
}

fn parse_cidr(text: &str) -> Option<Ipv4Cidr> {
    let (addr, prefix) = text.split_once('/')?;
    let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32)?;
    Some(Ipv4Cidr::new(parse_ipv4(addr)?, prefix))
}

// ------------------------------------------------------------------------------------------
// Persistence
// ------------------------------------------------------------------------------------------

const fn crc_table() -> [u32; 256] {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
}

static CRC_TABLE: [u32; 256] = crc_table();

fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = !0u32;
    for part in parts {
        for &b in *part {
            c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
        }
    }
    !c
}

/// The log on the disk, mirrored in RAM.
struct Log {
    disk: Disk,
    image: Vec<u8>,
    epoch: u32,
    end: usize,
    dirty: Option<(usize, usize)>,
}

impl Log {
    /// Opens the disk and replays the log into `map`.
    fn open(disk: Disk, map: &mut BTreeMap<Vec<u8>, Vec<u8>>) -> Option<Self> {
        let size = disk.size().min(MAX_DISK) as usize & !(SECTOR - 1);
        if size < 4 * SECTOR {
            println!("redis: disk of {size} bytes is too small; expected at least {} bytes", 4 * SECTOR);
            return None;
        }
        let mut image = vec![0u8; size];
        if let Err(e) = disk.read(0, &mut image) {
            println!("redis: reading the disk: {e}");
            return None;
        }
        let mut log = Self { disk, image, epoch: 0, end: SECTOR, dirty: None };
        if &log.image[..8] == MAGIC {
            log.epoch = u32::from_le_bytes(log.image[8..12].try_into().unwrap_or([0; 4]));
            log.replay(map);
        } else {
            println!("redis: disk has no log; formatting");
            log.reset(1);
        }
        Some(log)
    }

    fn replay(&mut self, map: &mut BTreeMap<Vec<u8>, Vec<u8>>) {
        let mut pos = SECTOR;
        let epoch = self.epoch.to_le_bytes();
        while let Some(head) = self.image.get(pos..pos + 8) {
            let len = u32::from_le_bytes(head[..4].try_into().unwrap_or([0; 4])) as usize;
            let crc = u32::from_le_bytes(head[4..8].try_into().unwrap_or([0; 4]));
            let Some(payload) = self.image.get(pos + 8..pos + 8 + len) else { break };
            if len == 0 || crc32(&[&epoch, payload]) != crc {
                break;
            }
            apply_record(payload, map);
            pos += 8 + len;
        }
        self.end = pos;
    }

    /// Starts an empty log with `epoch`.
    fn reset(&mut self, epoch: u32) {
        self.epoch = epoch;
        self.image[..SECTOR].fill(0);
        self.image[..8].copy_from_slice(MAGIC);
        self.image[8..12].copy_from_slice(&epoch.to_le_bytes());
        self.image[SECTOR..SECTOR + 8].fill(0);
        self.end = SECTOR;
        self.mark(0, SECTOR + 8);
    }

    fn mark(&mut self, lo: usize, hi: usize) {
        self.dirty = Some(match self.dirty {
            Some((a, b)) => (a.min(lo), b.max(hi)),
            None => (lo, hi),
        });
    }

    /// Appends one record; false when the disk is full.
    fn append(&mut self, parts: &[&[u8]]) -> bool {
        let len: usize = parts.iter().map(|p| p.len()).sum();
        let start = self.end;
        if start + 8 + len + 8 > self.image.len() {
            return false;
        }
        let epoch = self.epoch.to_le_bytes();
        let mut crc_parts: [&[u8]; 8] = [&[]; 8];
        crc_parts[0] = &epoch;
        for (slot, p) in crc_parts[1..].iter_mut().zip(parts) {
            *slot = p;
        }
        let crc = crc32(&crc_parts[..=parts.len().min(7)]);
        self.image[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
        self.image[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        let mut at = start + 8;
        for p in parts {
            self.image[at..at + p.len()].copy_from_slice(p);
            at += p.len();
        }
        self.image[at..at + 8].fill(0);
        self.end = at;
        self.mark(start, at + 8);
        true
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> bool {
        let (kl, vl) = ((key.len() as u32).to_le_bytes(), (value.len() as u32).to_le_bytes());
        self.append(&[&[OP_SET], &kl, key, &vl, value])
    }

    fn del(&mut self, key: &[u8]) -> bool {
        self.append(&[&[OP_DEL], &(key.len() as u32).to_le_bytes(), key])
    }

    /// Rewrites the log from `map` under a new epoch; false when even that does not fit.
    fn compact(&mut self, map: &BTreeMap<Vec<u8>, Vec<u8>>) -> bool {
        self.reset(self.epoch.wrapping_add(1));
        map.iter().all(|(k, v)| self.set(k, v))
    }

    /// Writes the changed sectors to the disk.
    fn flush(&mut self) {
        let Some((lo, hi)) = self.dirty.take() else { return };
        let lo = lo & !(SECTOR - 1);
        let hi = hi.div_ceil(SECTOR).saturating_mul(SECTOR).min(self.image.len());
        if let Err(e) = self.disk.write((lo / SECTOR) as u64, &self.image[lo..hi]).and_then(|()| self.disk.flush()) {
            println!("redis: disk write failed: {e}");
        }
    }
}

fn take<'a>(p: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if p.len() < n {
        return None;
    }
    let (a, b) = p.split_at(n);
    *p = b;
    Some(a)
}

fn take_bytes<'a>(p: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = u32::from_le_bytes(take(p, 4)?.try_into().ok()?) as usize;
    take(p, len)
}

fn apply_record(mut payload: &[u8], map: &mut BTreeMap<Vec<u8>, Vec<u8>>) {
    let Some(op) = take(&mut payload, 1) else { return };
    let Some(key) = take_bytes(&mut payload) else { return };
    match op[0] {
        OP_SET => {
            if let Some(value) = take_bytes(&mut payload) {
                map.insert(key.to_vec(), value.to_vec());
            }
        }
        OP_DEL => {
            map.remove(key);
        }
        _ => {}
    }
}

/// The key space and its log.
struct Db {
    map: BTreeMap<Vec<u8>, Vec<u8>>,
    log: Option<Log>,
}

impl Db {
    /// Logs a set (compacting when the disk is full); false when it cannot be made durable.
    fn log_set(&mut self, key: &[u8], value: &[u8]) -> bool {
        let Some(log) = self.log.as_mut() else { return true };
        log.set(key, value) || (log.compact(&self.map) && log.set(key, value))
    }

    fn log_del(&mut self, key: &[u8]) -> bool {
        let Some(log) = self.log.as_mut() else { return true };
        log.del(key) || (log.compact(&self.map) && log.del(key))
    }

    fn set(&mut self, key: &[u8], value: &[u8]) -> bool {
        if !self.log_set(key, value) {
            return false;
        }
        match self.map.get_mut(key) {
            Some(v) => {
                v.clear();
                v.extend_from_slice(value);
            }
            None => {
                self.map.insert(key.to_vec(), value.to_vec());
            }
        }
        true
    }

    fn del(&mut self, key: &[u8]) -> bool {
        if self.map.contains_key(key) && self.log_del(key) {
            self.map.remove(key);
            return true;
        }
        false
    }

    fn flush_all(&mut self) {
        self.map.clear();
        if let Some(log) = self.log.as_mut() {
            log.reset(log.epoch.wrapping_add(1));
        }
    }
}

// ------------------------------------------------------------------------------------------
// RESP
// ------------------------------------------------------------------------------------------

/// What the parser found at the start of the input.
enum Parse {
    /// A command (its arguments are in `args`) taking this many bytes.
    Complete(usize),
    /// More bytes are needed.
    Incomplete,
    /// A protocol error: reply with the message and drop this many bytes.
    Error(&'static str, usize),
}

fn find_crlf(buf: &[u8], from: usize) -> Option<usize> {
    buf.get(from..)?.windows(2).position(|w| w == b"\r\n").map(|i| from + i)
}

fn line_end(buf: &[u8], from: usize) -> usize {
    buf.get(from..).and_then(|b| b.iter().position(|&c| c == b'\n')).map_or(buf.len(), |i| from + i + 1)
}

fn parse_int(digits: &[u8]) -> Option<i64> {
    let (neg, digits) = match digits.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, digits),
    };
    if digits.is_empty() || digits.len() > 18 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let v = digits.iter().fold(0i64, |acc, &d| acc * 10 + i64::from(d - b'0'));
    Some(if neg { -v } else { v })
}

fn parse(buf: &[u8], args: &mut Vec<(usize, usize)>) -> Parse {
    args.clear();
    if buf.is_empty() {
        return Parse::Incomplete;
    }
    if buf[0] != b'*' {
        let Some(nl) = buf.iter().position(|&c| c == b'\n') else {
            return if buf.len() > MAX_INLINE {
                Parse::Error("Protocol error: too big inline request", buf.len())
            } else {
                Parse::Incomplete
            };
        };
        let line = &buf[..nl];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut i = 0;
        while i < line.len() {
            if line[i] == b' ' || line[i] == b'\t' {
                i += 1;
                continue;
            }
            let start = i;
            while i < line.len() && line[i] != b' ' && line[i] != b'\t' {
                i += 1;
            }
            args.push((start, i));
        }
        return Parse::Complete(nl + 1);
    }
    let Some(eol) = find_crlf(buf, 1) else {
        return if buf.len() > 32 {
            Parse::Error("Protocol error: invalid multibulk length", line_end(buf, 0))
        } else {
            Parse::Incomplete
        };
    };
    let Some(n) = parse_int(&buf[1..eol]).filter(|n| *n <= MAX_ARGS) else {
        return Parse::Error("Protocol error: invalid multibulk length", eol + 2);
    };
    let mut pos = eol + 2;
    for _ in 0..n.max(0) {
        if pos >= buf.len() {
            return Parse::Incomplete;
        }
        if buf[pos] != b'$' {
            return Parse::Error("Protocol error: expected '$'", line_end(buf, pos));
        }
        let Some(eol) = find_crlf(buf, pos + 1) else {
            return if buf.len() - pos > 32 {
                Parse::Error("Protocol error: invalid bulk length", line_end(buf, pos))
            } else {
                Parse::Incomplete
            };
        };
        let Some(len) = parse_int(&buf[pos + 1..eol]).filter(|l| (0..=MAX_BULK).contains(l)) else {
            return Parse::Error("Protocol error: invalid bulk length", eol + 2);
        };
        let start = eol + 2;
        let end = start + len as usize;
        if buf.len() < end + 2 {
            return Parse::Incomplete;
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Parse::Error("Protocol error: bulk string not terminated by CRLF", line_end(buf, end));
        }
        args.push((start, end));
        pos = end + 2;
    }
    Parse::Complete(pos)
}

fn bulk(out: &mut Vec<u8>, data: &[u8]) {
    let _ = write!(Buf(out), "${}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

fn int(out: &mut Vec<u8>, n: i64) {
    let _ = write!(Buf(out), ":{n}\r\n");
}

fn error(out: &mut Vec<u8>, msg: &str) {
    out.extend_from_slice(b"-");
    out.extend_from_slice(msg.as_bytes());
    out.extend_from_slice(b"\r\n");
}

struct Buf<'a>(&'a mut Vec<u8>);

impl core::fmt::Write for Buf<'_> {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// What a command asks of the connection.
#[derive(PartialEq, Eq)]
enum After {
    Continue,
    Close,
    Shutdown,
}

fn wrong_args(out: &mut Vec<u8>, name: &[u8]) {
    out.extend_from_slice(b"-ERR wrong number of arguments for '");
    out.extend(name.iter().map(u8::to_ascii_lowercase));
    out.extend_from_slice(b"' command\r\n");
}

fn incr_by(db: &mut Db, out: &mut Vec<u8>, key: &[u8], by: i64) {
    let current = match db.map.get(key) {
        None => 0,
        Some(v) => match core::str::from_utf8(v).ok().and_then(|s| s.parse::<i64>().ok()) {
            Some(n) => n,
            None => return error(out, "ERR value is not an integer or out of range"),
        },
    };
    let Some(next) = current.checked_add(by) else {
        return error(out, "ERR increment or decrement would overflow");
    };
    let mut digits = Vec::new();
    let _ = write!(Buf(&mut digits), "{next}");
    if db.set(key, &digits) {
        int(out, next);
    } else {
        error(out, "ERR disk full");
    }
}

fn execute(db: &mut Db, args: &[&[u8]], out: &mut Vec<u8>) -> After {
    let Some((&name, rest)) = args.split_first() else { return After::Continue };
    let mut upper = [0u8; 16];
    let cmd: &[u8] = if name.len() <= 16 {
        for (u, c) in upper.iter_mut().zip(name) {
            *u = c.to_ascii_uppercase();
        }
        &upper[..name.len()]
    } else {
        b"?"
    };
    let n = rest.len();
    let arity_ok = match cmd {
        b"PING" => n <= 1,
        b"ECHO" | b"GET" | b"INCR" | b"DECR" => n == 1,
        b"SET" => n >= 2,
        b"INCRBY" | b"DECRBY" => n == 2,
        b"DEL" | b"EXISTS" | b"MGET" => n >= 1,
        b"MSET" => n >= 2 && n % 2 == 0,
        b"DBSIZE" | b"TIME" => n == 0,
        _ => true,
    };
    if !arity_ok {
        wrong_args(out, name);
        return After::Continue;
    }
    match cmd {
        b"PING" => match rest.first() {
            Some(msg) => bulk(out, msg),
            None => out.extend_from_slice(b"+PONG\r\n"),
        },
        b"ECHO" => bulk(out, rest[0]),
        b"GET" => match db.map.get(rest[0]) {
            Some(v) => bulk(out, v),
            None => out.extend_from_slice(b"$-1\r\n"),
        },
        b"SET" => {
            let (mut nx, mut xx, mut i) = (false, false, 2);
            while i < n {
                let opt = rest[i].to_ascii_uppercase();
                match opt.as_slice() {
                    b"NX" => nx = true,
                    b"XX" => xx = true,
                    b"EX" | b"PX" | b"EXAT" | b"PXAT" if i + 1 < n => i += 1,
                    b"KEEPTTL" => {}
                    _ => {
                        error(out, "ERR syntax error");
                        return After::Continue;
                    }
                }
                i += 1;
            }
            let exists = db.map.contains_key(rest[0]);
            if (nx && exists) || (xx && !exists) {
                out.extend_from_slice(b"$-1\r\n");
            } else if db.set(rest[0], rest[1]) {
                out.extend_from_slice(b"+OK\r\n");
            } else {
                error(out, "ERR disk full");
            }
        }
        b"DEL" => {
            let removed = rest.iter().filter(|k| db.del(k)).count();
            int(out, removed as i64);
        }
        b"EXISTS" => int(out, rest.iter().filter(|k| db.map.contains_key(**k)).count() as i64),
        b"INCR" => incr_by(db, out, rest[0], 1),
        b"DECR" => incr_by(db, out, rest[0], -1),
        b"INCRBY" | b"DECRBY" => match core::str::from_utf8(rest[1]).ok().and_then(|s| s.parse::<i64>().ok()) {
            Some(by) => incr_by(db, out, rest[0], if cmd == b"DECRBY" { by.wrapping_neg() } else { by }),
            None => error(out, "ERR value is not an integer or out of range"),
        },
        b"MGET" => {
            let _ = write!(Buf(out), "*{n}\r\n");
            for k in rest {
                match db.map.get(*k) {
                    Some(v) => bulk(out, v),
                    None => out.extend_from_slice(b"$-1\r\n"),
                }
            }
        }
        b"MSET" => {
            if rest.chunks(2).all(|kv| db.set(kv[0], kv[1])) {
                out.extend_from_slice(b"+OK\r\n");
            } else {
                error(out, "ERR disk full");
            }
        }
        b"DBSIZE" => int(out, db.map.len() as i64),
        b"TIME" => {
            // As Redis: seconds and microseconds, two bulk strings; here of the guest clock.
            let (now, per_second) = (clock_now(), ticks_per_second().max(1));
            let mut text = Vec::new();
            let _ = write!(Buf(&mut text), "{}", now / per_second);
            out.extend_from_slice(b"*2\r\n");
            bulk(out, &text);
            text.clear();
            let _ = write!(Buf(&mut text), "{}", (now % per_second) * 1_000_000 / per_second);
            bulk(out, &text);
        }
        b"FLUSHALL" | b"FLUSHDB" => {
            db.flush_all();
            out.extend_from_slice(b"+OK\r\n");
        }
        b"CONFIG" => {
            let sub = rest.first().map(|s| s.to_ascii_uppercase());
            match (sub.as_deref(), rest.get(1)) {
                (Some(b"GET"), Some(param)) => {
                    let value: Option<&[u8]> = match param.to_ascii_lowercase().as_slice() {
                        b"save" => Some(b""),
                        b"appendonly" => Some(b"no"),
                        b"databases" => Some(b"1"),
                        _ => None,
                    };
                    match value {
                        Some(v) => {
                            out.extend_from_slice(b"*2\r\n");
                            bulk(out, param);
                            bulk(out, v);
                        }
                        None => out.extend_from_slice(b"*0\r\n"),
                    }
                }
                (Some(b"GET"), None) => wrong_args(out, b"config|get"),
                _ => out.extend_from_slice(b"+OK\r\n"),
            }
        }
        b"COMMAND" => out.extend_from_slice(b"*0\r\n"),
        b"CLIENT" | b"SELECT" | b"READONLY" | b"RESET" => out.extend_from_slice(b"+OK\r\n"),
        b"INFO" => bulk(out, b"# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\nos:colo-guest\r\n"),
        b"QUIT" => {
            out.extend_from_slice(b"+OK\r\n");
            return After::Close;
        }
        b"SHUTDOWN" => return After::Shutdown,
        _ => {
            out.extend_from_slice(b"-ERR unknown command '");
            out.extend(name.iter().take(64).map(|&c| if c.is_ascii_graphic() { c } else { b'?' }));
            out.extend_from_slice(b"', with args beginning with: \r\n");
        }
    }
    After::Continue
}

// ------------------------------------------------------------------------------------------
// Connections
// ------------------------------------------------------------------------------------------

struct Conn {
    handle: SocketHandle,
    input: Vec<u8>,
    out: Vec<u8>,
    args: Vec<(usize, usize)>,
    close_after_flush: bool,
}

/// Reads and executes what arrived; true when anything happened.
fn serve(conn: &mut Conn, sockets: &mut SocketSet<'_>, db: &mut Db, shutdown: &mut bool) -> bool {
    let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
    if !socket.is_open() {
        conn.input.clear();
        conn.out.clear();
        conn.close_after_flush = false;
        let _ = socket.listen(PORT);
        return false;
    }
    let mut active = false;
    while socket.can_recv() && conn.input.len() < 4 * MAX_BULK as usize {
        let input = &mut conn.input;
        let got = socket
            .recv(|b| {
                input.extend_from_slice(b);
                (b.len(), b.len())
            })
            .unwrap_or(0);
        if got == 0 {
            break;
        }
        active = true;
    }
    let mut consumed = 0;
    let mut args: Vec<&[u8]> = Vec::new();
    while !conn.close_after_flush && conn.out.len() < OUT_HIGH_WATER {
        match parse(&conn.input[consumed..], &mut conn.args) {
            Parse::Incomplete => break,
            Parse::Error(msg, skip) => {
                conn.out.extend_from_slice(b"-ERR ");
                conn.out.extend_from_slice(msg.as_bytes());
                conn.out.extend_from_slice(b"\r\n");
                consumed += skip.max(1).min(conn.input.len() - consumed);
            }
            Parse::Complete(len) => {
                let base = consumed;
                args.clear();
                args.extend(conn.args.iter().map(|&(s, e)| &conn.input[base + s..base + e]));
                match execute(db, &args, &mut conn.out) {
                    After::Continue => {}
                    After::Close => conn.close_after_flush = true,
                    After::Shutdown => {
                        *shutdown = true;
                        conn.close_after_flush = true;
                    }
                }
                consumed += len;
            }
        }
        active = true;
    }
    drop(args);
    conn.input.drain(..consumed);
    active
}

/// Sends what is waiting; true when anything was sent.
fn send(conn: &mut Conn, sockets: &mut SocketSet<'_>) -> bool {
    let socket = sockets.get_mut::<tcp::Socket>(conn.handle);
    let mut sent = 0;
    if !conn.out.is_empty() && socket.can_send() {
        sent = socket.send_slice(&conn.out).unwrap_or(0);
        conn.out.drain(..sent);
    }
    if conn.out.is_empty() && (conn.close_after_flush || socket.state() == tcp::State::CloseWait) {
        socket.close();
    }
    sent > 0
}

fn main(env: &Env) -> i32 {
    let shim = ShimConfig::from_env(env);
    let Some(cidr) = env.arg("ip").and_then(parse_cidr) else {
        println!("redis: no usable `ip=`; expected an IPv4 address with prefix, e.g. ip=10.77.20.3/24");
        return 2;
    };
    let mut nic = match PvNic::attach() {
        Ok(nic) => nic,
        Err(e) => {
            println!("redis: no paravirtual NIC ({e:?}); expected `mac=` on the module line");
            return 3;
        }
    };
    nic.coarse_window = shim.win;
    let mac = nic.mac();
    let mut config = Config::new(EthernetAddress(mac).into());
    config.random_seed = shim.random_seed(mac);
    let mut iface = Interface::new(config, &mut nic, netshim::now());
    iface.update_ip_addrs(|addrs| {
        let _ = addrs.push(IpCidr::Ipv4(cidr));
    });
    if let Some(gw) = env.arg("gw").and_then(parse_ipv4) {
        let _ = iface.routes_mut().add_default_ipv4_route(gw);
    }
    let mut sockets = SocketSet::new(Vec::new());
    let mut conns = Vec::new();
    for _ in 0..SOCKETS {
        let mut socket =
            tcp::Socket::new(tcp::SocketBuffer::new(vec![0; RX_BUFFER]), tcp::SocketBuffer::new(vec![0; TX_BUFFER]));
        shim.configure(&mut socket);
        let _ = socket.listen(PORT);
        conns.push(Conn {
            handle: sockets.add(socket),
            input: Vec::with_capacity(4096),
            out: Vec::with_capacity(4096),
            args: Vec::with_capacity(8),
            close_after_flush: false,
        });
    }
    let mut db = Db { map: BTreeMap::new(), log: None };
    match Disk::open() {
        Ok(disk) => db.log = Log::open(disk, &mut db.map),
        Err(e) => println!("redis: {e}; data will not persist"),
    }
    println!(
        "redis: listening on {}:{PORT} ({SOCKETS} sockets, mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}); {} keys restored; \
         shim ts={} ack={} win={} isn={}",
        cidr.address(),
        mac[0],
        mac[1],
        mac[2],
        mac[3],
        mac[4],
        mac[5],
        db.map.len(),
        shim.ts,
        shim.ack,
        shim.win,
        shim.isn
    );
    let mut shutdown = false;
    let mut shutdown_at = None;
    let mut isn_stir = (!shim.isn).then(netshim::IsnStir::new);
    loop {
        if let Some(stir) = isn_stir.as_mut() {
            stir.turn(&mut iface, cidr.address().into());
        }
        nic.notify();
        iface.poll(netshim::now(), &mut nic, &mut sockets);
        let mut active = false;
        for conn in &mut conns {
            active |= serve(conn, &mut sockets, &mut db, &mut shutdown);
        }
        if let Some(log) = db.log.as_mut() {
            log.flush();
        }
        for conn in &mut conns {
            active |= send(conn, &mut sockets);
        }
        iface.poll(netshim::now(), &mut nic, &mut sockets);
        nic.flush();
        if shutdown {
            let now = clock_now();
            let at = *shutdown_at.get_or_insert(now);
            let quiet = conns.iter().all(|c| c.out.is_empty());
            if quiet && now > at + 200 || now > at + 2000 {
                break;
            }
        }
        if !active && !nic.rx_ready() {
            let now = netshim::now();
            let delay = iface.poll_delay(now, &sockets).map_or(50, |d| d.total_millis()).min(50);
            if delay > 0 {
                block_until(clock_now() + delay);
            }
        }
    }
    let c = nic.counters;
    println!(
        "redis: shutting down with {} keys; nic rx_frames={} tx_frames={} rx_errors={} tx_full={} windows_rounded={}",
        db.map.len(),
        c.rx_frames,
        c.tx_frames,
        c.rx_errors,
        c.tx_full,
        c.windows_rounded
    );
    0
}
