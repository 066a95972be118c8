//! Sequence rewriting on the secondary: make the SVM's TCP connections speak the PVM's
//! sequence numbers, so after failover the SVM's connections continue the PVM's.
//!
//! Per connection (keyed by the server-to-client [`FlowKey`]) the rewriter knows
//! `delta = pvm_isn - svm_isn` (mod 2^32). Two translations, one per direction:
//! - **SVM -> client** (SVM output, to the comparator while replicating, to clients after
//!   failover), [`SequenceRewriter::rewrite_svm_output`]: `seq += delta`. Acknowledgement
//!   numbers of SVM output are in the *client's* sequence space, which both VMs share, so they
//!   are left alone.
//! - **client -> SVM** (mirrored client input, and client input after failover),
//!   [`SequenceRewriter::rewrite_client_input`]: `ack -= delta`, and the same for SACK blocks.
//!   Client sequence numbers are left alone.
//!
//! TCP checksums (IPv4 and IPv6 pseudo-headers) are fixed incrementally (RFC 1624) or by full
//! recomputation ([`ChecksumFix`]). TCP timestamps are not touched (the guest shim makes them
//! coarse and equal on both VMs).
//!
//! How `delta` is learned:
//! - connection opened while replicating (including after a checkpoint): from the SYN/SYN-ACK
//!   pair: the SVM's ISN from its own SYN / SYN-ACK ([`SequenceRewriter::rewrite_svm_output`]
//!   observes it), the PVM's from the PVM's SYN / SYN-ACK reported by the primary
//!   ([`SequenceRewriter::observe_pvm_output`]) or, failing that, from the client's handshake
//!   ACK (`ack - 1`, [`SequenceRewriter::rewrite_client_input`]); or set explicitly
//!   ([`SequenceRewriter::set_delta`], e.g. from the comparator's `seq_offset`);
//! - a committed checkpoint copies the PVM's state into the SVM: from then on the SVM *uses* the
//!   PVM's sequence numbers, so every known connection's delta becomes 0
//!   ([`SequenceRewriter::on_checkpoint_committed`]);
//! - after failover ([`SequenceRewriter::promote`]) deltas are frozen: existing connections keep
//!   being translated for their lifetime; connections the promoted SVM opens afterwards have
//!   no PVM counterpart and get delta 0.
//!
//! A connection whose delta is unknown passes untranslated ([`RewriteOutcome::UnknownOffset`]).

use alloc::collections::BTreeMap;

use smoltcp::wire::{IpAddress, Ipv4Address, Ipv6Address, TcpPacket};

use super::packet::{parse_frame_with, ChecksumPolicy, FlowKey, NetLayer, ParsedFrame, TcpFlags};

/// How checksums are fixed after rewriting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumFix {
    /// RFC 1624 incremental update (default).
    Incremental,
    /// Recompute the whole TCP checksum.
    Full,
}

/// Whether the secondary is still replicating or has taken over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriterMode {
    /// Secondary replicating: deltas are learned and reset by checkpoints.
    Replicating,
    /// SVM promoted after failover: deltas frozen.
    Promoted,
}

/// What happened to a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RewriteOutcome {
    /// Sequence/ack numbers translated, checksum fixed.
    Rewritten,
    /// TCP, delta known and 0: unchanged.
    Unchanged,
    /// TCP, delta unknown: unchanged.
    UnknownOffset,
    /// Not TCP (or unparseable): unchanged.
    NotTcp,
}

/// Counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RewriterStats {
    /// SVM output frames translated.
    pub svm_rewritten: u64,
    /// Client input frames translated.
    pub client_rewritten: u64,
    /// TCP frames passed untranslated because the delta was unknown.
    pub unknown_offset: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Offsets {
    pvm_isn: Option<u32>,
    svm_isn: Option<u32>,
    /// `pvm - svm`; fixed once known.
    delta: Option<u32>,
}

impl Offsets {
    /// A SYN / SYN-ACK from one side. A new ISN on a connection whose delta is settled starts a
    /// new incarnation (4-tuple reuse, or the first handshake after a checkpoint zeroed it):
    /// everything is learned afresh; a retransmitted SYN (same ISN) changes nothing.
    fn syn_seen(&mut self, pvm: bool, isn: u32) {
        let mine = if pvm { self.pvm_isn } else { self.svm_isn };
        if mine == Some(isn) {
            return;
        }
        if self.delta.is_some() {
            *self = Offsets::default();
        }
        if pvm {
            self.pvm_isn = Some(isn);
        } else {
            self.svm_isn = Some(isn);
        }
        self.settle();
    }

    fn settle(&mut self) {
        if self.delta.is_none() {
            if let (Some(p), Some(s)) = (self.pvm_isn, self.svm_isn) {
                self.delta = Some(p.wrapping_sub(s));
            }
        }
    }
}

/// Per-connection SVM TCP sequence translation. See the module documentation.
#[derive(Debug)]
pub struct SequenceRewriter {
    conns: BTreeMap<FlowKey, Offsets>,
    mode: RewriterMode,
    fix: ChecksumFix,
    checksums: ChecksumPolicy,
    stats: RewriterStats,
}

impl Default for SequenceRewriter {
    fn default() -> Self {
        Self::new(ChecksumFix::Incremental)
    }
}

/// RFC 1624 eqn. 3 update of a ones'-complement checksum for one 32-bit field change.
pub fn checksum_update_u32(csum: u16, old: u32, new: u32) -> u16 {
    let mut sum: u32 = u32::from(!csum);
    for (o, n) in [(old >> 16, new >> 16), (old & 0xffff, new & 0xffff)] {
        sum += u32::from(!(o as u16)) + n;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn rd32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn wr32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

impl SequenceRewriter {
    /// A rewriter in [`RewriterMode::Replicating`].
    pub fn new(fix: ChecksumFix) -> Self {
        SequenceRewriter {
            conns: BTreeMap::new(),
            mode: RewriterMode::Replicating,
            fix,
            checksums: ChecksumPolicy::Verify,
            stats: RewriterStats::default(),
        }
    }

    /// Whether frames must carry valid checksums to be translated. Use the same policy as the
    /// comparator ([`super::comparator::ComparatorLimits::checksums`]): with
    /// [`ChecksumPolicy::Ignore`] (guests using checksum offload) a frame whose checksum is
    /// not filled in yet is translated too (the incremental fix then keeps the offload's
    /// partial sum consistent; [`ChecksumFix::Full`] computes a valid one). Default: verify.
    pub fn with_checksum_policy(mut self, policy: ChecksumPolicy) -> Self {
        self.checksums = policy;
        self
    }

    fn parse(&self, frame: &[u8]) -> ParsedFrame {
        parse_frame_with(frame, self.checksums)
    }

    /// Current mode.
    pub fn mode(&self) -> RewriterMode {
        self.mode
    }

    /// Counters.
    pub fn stats(&self) -> &RewriterStats {
        &self.stats
    }

    /// `pvm - svm` for a connection (server-to-client key), if known.
    pub fn delta(&self, conn: &FlowKey) -> Option<u32> {
        self.conns.get(conn)?.delta
    }

    /// Set a connection's delta explicitly (`pvm_seq - svm_seq`).
    pub fn set_delta(&mut self, conn: FlowKey, delta: u32) {
        self.conns.entry(conn).or_default().delta = Some(delta);
    }

    /// Every connection with a known, non-zero delta (for a promoted SVM's client edge, which
    /// a new secondary must inherit so that it can take over those connections too).
    pub fn deltas(&self) -> impl Iterator<Item = (FlowKey, u32)> + '_ {
        self.conns.iter().filter_map(|(k, o)| o.delta.filter(|&d| d != 0).map(|d| (*k, d)))
    }

    /// Forget a connection.
    pub fn forget(&mut self, conn: &FlowKey) {
        self.conns.remove(conn);
    }

    /// Learn the PVM's ISN from a PVM SYN / SYN-ACK (server-to-client frame) the primary
    /// reports. Other frames are ignored.
    pub fn observe_pvm_output(&mut self, frame: &[u8]) {
        let p = self.parse(frame);
        if let Some(t) = p.tcp() {
            if t.flags.contains(TcpFlags::SYN) && self.mode == RewriterMode::Replicating {
                self.conns.entry(p.flow).or_default().syn_seen(true, t.seq);
            }
        }
    }

    /// A committed checkpoint: the SVM now runs the PVM's TCP state and sequence numbers, so
    /// every known connection's delta becomes 0; half-learned handshakes restart.
    pub fn on_checkpoint_committed(&mut self) {
        if self.mode == RewriterMode::Promoted {
            return;
        }
        for o in self.conns.values_mut() {
            *o = Offsets { pvm_isn: None, svm_isn: None, delta: Some(0) };
        }
    }

    /// Failover: the SVM is the primary now. Deltas are frozen; new connections get delta 0.
    pub fn promote(&mut self) {
        self.mode = RewriterMode::Promoted;
    }

    /// Direction **SVM -> client**: `seq += delta` on an SVM output frame, checksum fixed.
    /// Learns the SVM's ISN from its SYN / SYN-ACK.
    pub fn rewrite_svm_output(&mut self, frame: &mut [u8]) -> RewriteOutcome {
        let p = self.parse(frame);
        let Some(t) = p.tcp() else {
            return RewriteOutcome::NotTcp;
        };
        let syn = t.flags.contains(TcpFlags::SYN);
        let mode = self.mode;
        let o = self.conns.entry(p.flow).or_default();
        if syn {
            match mode {
                RewriterMode::Replicating => o.syn_seen(false, t.seq),
                RewriterMode::Promoted => {
                    if o.delta.is_none() {
                        o.delta = Some(0);
                    }
                }
            }
        } else if mode == RewriterMode::Promoted && o.delta.is_none() {
            o.delta = Some(0);
        }
        let Some(delta) = o.delta else {
            self.stats.unknown_offset += 1;
            return RewriteOutcome::UnknownOffset;
        };
        if delta == 0 {
            return RewriteOutcome::Unchanged;
        }
        let h = t.header_offset;
        let old = rd32(frame, h + 4);
        self.patch(frame, &p, &[(h + 4, old, old.wrapping_add(delta))]);
        self.stats.svm_rewritten += 1;
        RewriteOutcome::Rewritten
    }

    /// Direction **client -> SVM**: `ack -= delta` (and SACK block edges) on a client input
    /// frame, checksum fixed. Learns the PVM's ISN from the client's handshake ACK when the
    /// primary did not report it.
    pub fn rewrite_client_input(&mut self, frame: &mut [u8]) -> RewriteOutcome {
        let p = self.parse(frame);
        let Some(t) = p.tcp() else {
            return RewriteOutcome::NotTcp;
        };
        let key = p.flow.reversed();
        let Some(o) = self.conns.get_mut(&key) else {
            if self.mode == RewriterMode::Promoted {
                return RewriteOutcome::Unchanged;
            }
            self.stats.unknown_offset += 1;
            return RewriteOutcome::UnknownOffset;
        };
        if o.delta.is_none()
            && o.svm_isn.is_some()
            && o.pvm_isn.is_none()
            && t.flags.contains(TcpFlags::ACK)
            && !t.flags.intersects(TcpFlags::SYN | TcpFlags::RST)
        {
            // Handshake ACK: acknowledges the PVM's SYN-ACK, i.e. pvm_isn + 1.
            o.pvm_isn = Some(t.ack.wrapping_sub(1));
            o.settle();
        }
        let Some(delta) = o.delta else {
            self.stats.unknown_offset += 1;
            return RewriteOutcome::UnknownOffset;
        };
        if delta == 0 || !t.flags.contains(TcpFlags::ACK) {
            return RewriteOutcome::Unchanged;
        }
        let h = t.header_offset;
        let mut edits: heapless::Vec<(usize, u32, u32), 9> = heapless::Vec::new();
        let old = rd32(frame, h + 8);
        let _ = edits.push((h + 8, old, old.wrapping_sub(delta)));
        // SACK blocks in the options.
        let hl = usize::from(frame[h + 12] >> 4) * 4;
        let mut i = h + 20;
        let end = h + hl;
        while i < end {
            match frame[i] {
                0 => break,
                1 => i += 1,
                kind => {
                    if i + 1 >= end {
                        break;
                    }
                    let len = usize::from(frame[i + 1]);
                    if len < 2 || i + len > end {
                        break;
                    }
                    if kind == 5 {
                        let mut b = i + 2;
                        while b + 8 <= i + len {
                            for at in [b, b + 4] {
                                let v = rd32(frame, at);
                                let _ = edits.push((at, v, v.wrapping_sub(delta)));
                            }
                            b += 8;
                        }
                    }
                    i += len;
                }
            }
        }
        self.patch(frame, &p, &edits);
        self.stats.client_rewritten += 1;
        RewriteOutcome::Rewritten
    }

    /// Write 32-bit fields `(offset, old, new)` and fix the TCP checksum.
    fn patch(&self, frame: &mut [u8], p: &ParsedFrame, edits: &[(usize, u32, u32)]) {
        let Some(t) = p.tcp() else { return };
        let h = t.header_offset;
        for &(at, _, new) in edits {
            wr32(frame, at, new);
        }
        match self.fix {
            ChecksumFix::Incremental => {
                let mut c = u16::from_be_bytes([frame[h + 16], frame[h + 17]]);
                for &(_, old, new) in edits {
                    c = checksum_update_u32(c, old, new);
                }
                frame[h + 16..h + 18].copy_from_slice(&c.to_be_bytes());
            }
            ChecksumFix::Full => {
                let (src, dst) = match p.net {
                    NetLayer::V4 { offset } => (
                        IpAddress::Ipv4(Ipv4Address::from(rd32(frame, offset + 12))),
                        IpAddress::Ipv4(Ipv4Address::from(rd32(frame, offset + 16))),
                    ),
                    NetLayer::V6 { offset } => {
                        let mut s = [0u8; 16];
                        let mut d = [0u8; 16];
                        s.copy_from_slice(&frame[offset + 8..offset + 24]);
                        d.copy_from_slice(&frame[offset + 24..offset + 40]);
                        (IpAddress::Ipv6(Ipv6Address::from(s)), IpAddress::Ipv6(Ipv6Address::from(d)))
                    }
                    NetLayer::None => return,
                };
                let mut tcp = TcpPacket::new_unchecked(&mut frame[h..t.payload.end]);
                tcp.fill_checksum(&src, &dst);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colo::packet::{parse_frame, ParsedFrame};
    use alloc::vec;
    use alloc::vec::Vec;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Packet, Ipv4Repr, Ipv6Packet,
        Ipv6Repr, TcpControl, TcpRepr, TcpSeqNumber,
    };

    const SRV: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
    const CLI: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);

    #[allow(clippy::too_many_arguments)]
    fn frame(
        v6: bool,
        from_server: bool,
        seq: u32,
        ack: Option<u32>,
        ctl: TcpControl,
        sack: [Option<(u32, u32)>; 3],
        payload: &[u8],
    ) -> Vec<u8> {
        let (sp, dp) = if from_server { (80, 4000) } else { (4000, 80) };
        let repr = TcpRepr {
            src_port: sp,
            dst_port: dp,
            control: ctl,
            seq_number: TcpSeqNumber(seq as i32),
            ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
            window_len: 100,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: sack,
            timestamp: None,
            payload,
        };
        let caps = ChecksumCapabilities::default();
        let hdr = if v6 { 40 } else { 20 };
        let mut buf = vec![0u8; 14 + hdr + repr.buffer_len()];
        let mut f = EthernetFrame::new_unchecked(&mut buf[..]);
        EthernetRepr {
            src_addr: EthernetAddress([2, 0, 0, 0, 0, 1]),
            dst_addr: EthernetAddress([2, 0, 0, 0, 0, 2]),
            ethertype: if v6 { EthernetProtocol::Ipv6 } else { EthernetProtocol::Ipv4 },
        }
        .emit(&mut f);
        if v6 {
            let a = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
            let b = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
            let (s, d) = if from_server { (a, b) } else { (b, a) };
            let mut p = Ipv6Packet::new_unchecked(&mut buf[14..]);
            Ipv6Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Tcp,
                payload_len: repr.buffer_len(),
                hop_limit: 64,
            }
            .emit(&mut p);
            let mut t = TcpPacket::new_unchecked(p.payload_mut());
            repr.emit(&mut t, &s.into(), &d.into(), &caps);
        } else {
            let (s, d) = if from_server { (SRV, CLI) } else { (CLI, SRV) };
            let mut p = Ipv4Packet::new_unchecked(&mut buf[14..]);
            Ipv4Repr {
                src_addr: s,
                dst_addr: d,
                next_header: IpProtocol::Tcp,
                payload_len: repr.buffer_len(),
                hop_limit: 64,
            }
            .emit(&mut p, &caps);
            let mut t = TcpPacket::new_unchecked(p.payload_mut());
            repr.emit(&mut t, &s.into(), &d.into(), &caps);
        }
        buf
    }

    fn tcp(f: &[u8]) -> ParsedFrame {
        let p = parse_frame(f);
        assert!(p.tcp().is_some(), "checksum must verify: {:?}", p.class);
        p
    }

    #[test]
    fn incremental_checksum_matches_full() {
        for &(old, new) in &[(0u32, 1u32), (0xffff_ffff, 0), (0x1234_5678, 0x8765_4321)] {
            for v6 in [false, true] {
                let mut a = frame(v6, true, old, Some(9), TcpControl::None, [None; 3], b"xyz");
                let mut r = SequenceRewriter::new(ChecksumFix::Incremental);
                let key = tcp(&a).flow;
                r.set_delta(key, new.wrapping_sub(old));
                let mut b = a.clone();
                assert_eq!(r.rewrite_svm_output(&mut a), RewriteOutcome::Rewritten);
                let mut r2 = SequenceRewriter::new(ChecksumFix::Full);
                r2.set_delta(key, new.wrapping_sub(old));
                r2.rewrite_svm_output(&mut b);
                assert_eq!(a, b);
                assert_eq!(tcp(&a).tcp().unwrap().seq, new);
            }
        }
    }

    #[test]
    fn handshake_pair_learns_delta_and_translates_both_directions() {
        for v6 in [false, true] {
            let mut r = SequenceRewriter::default();
            // PVM SYN-ACK (reported by the primary), SVM SYN-ACK with another ISN.
            let pvm = frame(v6, true, 1000, Some(51), TcpControl::Syn, [None; 3], b"");
            r.observe_pvm_output(&pvm);
            let mut svm = frame(v6, true, 5000, Some(51), TcpControl::Syn, [None; 3], b"");
            assert_eq!(r.rewrite_svm_output(&mut svm), RewriteOutcome::Rewritten);
            assert_eq!(svm, pvm, "SVM SYN-ACK now equals the PVM's");
            // SVM data -> client: seq into PVM space.
            let mut d = frame(v6, true, 5001, Some(51), TcpControl::Psh, [None; 3], b"hi");
            r.rewrite_svm_output(&mut d);
            assert_eq!(tcp(&d).tcp().unwrap().seq, 1001);
            // Client -> SVM: ack back into SVM space, SACK blocks too.
            let mut c = frame(v6, false, 51, Some(1003), TcpControl::None, [Some((1010, 1020)), None, None], b"");
            assert_eq!(r.rewrite_client_input(&mut c), RewriteOutcome::Rewritten);
            let want = frame(v6, false, 51, Some(5003), TcpControl::None, [Some((5010, 5020)), None, None], b"");
            assert_eq!(c, want);
        }
    }

    #[test]
    fn client_handshake_ack_teaches_pvm_isn() {
        let mut r = SequenceRewriter::default();
        let mut svm = frame(false, true, 5000, Some(51), TcpControl::Syn, [None; 3], b"");
        assert_eq!(r.rewrite_svm_output(&mut svm), RewriteOutcome::UnknownOffset);
        let mut c = frame(false, false, 51, Some(1001), TcpControl::None, [None; 3], b"");
        assert_eq!(r.rewrite_client_input(&mut c), RewriteOutcome::Rewritten);
        assert_eq!(tcp(&c).tcp().unwrap().ack, 5001);
        assert_eq!(r.delta(&tcp(&svm).flow), Some(1000u32.wrapping_sub(5000)));
    }

    #[test]
    fn checkpoint_zeroes_delta_and_new_connections_relearn() {
        let mut r = SequenceRewriter::default();
        let key = tcp(&frame(false, true, 1, None, TcpControl::None, [None; 3], b"")).flow;
        r.set_delta(key, 77);
        r.on_checkpoint_committed();
        let mut d = frame(false, true, 10, Some(1), TcpControl::None, [None; 3], b"a");
        let orig = d.clone();
        assert_eq!(r.rewrite_svm_output(&mut d), RewriteOutcome::Unchanged);
        assert_eq!(d, orig);
        // Same 4-tuple reopened after the checkpoint: learned from the new SYN/SYN-ACK pair.
        r.observe_pvm_output(&frame(false, true, 300, Some(1), TcpControl::Syn, [None; 3], b""));
        let mut s = frame(false, true, 100, Some(1), TcpControl::Syn, [None; 3], b"");
        assert_eq!(r.rewrite_svm_output(&mut s), RewriteOutcome::Rewritten);
        assert_eq!(tcp(&s).tcp().unwrap().seq, 300);
    }

    #[test]
    fn failover_keeps_translating_and_new_connections_pass() {
        let mut r = SequenceRewriter::default();
        let key = tcp(&frame(false, true, 1, None, TcpControl::None, [None; 3], b"")).flow;
        r.set_delta(key, 1000);
        r.promote();
        r.on_checkpoint_committed(); // no effect once promoted
        let mut d = frame(false, true, 10, Some(1), TcpControl::None, [None; 3], b"a");
        assert_eq!(r.rewrite_svm_output(&mut d), RewriteOutcome::Rewritten);
        assert_eq!(tcp(&d).tcp().unwrap().seq, 1010);
        let mut c = frame(false, false, 1, Some(1011), TcpControl::None, [None; 3], b"");
        r.rewrite_client_input(&mut c);
        assert_eq!(tcp(&c).tcp().unwrap().ack, 11);
        // A connection the promoted SVM opens itself (other client port) is not translated.
        let mut n = frame(false, true, 10, Some(1), TcpControl::Syn, [None; 3], b"");
        n[14 + 20 + 2] = 0x99; // other destination port; checksum now wrong -> NotTcp
        assert_eq!(r.rewrite_svm_output(&mut n), RewriteOutcome::NotTcp);
    }

    #[test]
    fn non_tcp_untouched() {
        let mut r = SequenceRewriter::default();
        let mut g = vec![0u8; 40];
        assert_eq!(r.rewrite_svm_output(&mut g), RewriteOutcome::NotTcp);
        assert_eq!(r.rewrite_client_input(&mut g), RewriteOutcome::NotTcp);
    }

    /// Also-seen item of issue 15: with the comparator's `ChecksumPolicy::Ignore` (checksum
    /// offload: the TCP checksum is not filled in yet), SVM output is translated too.
    #[test]
    fn offloaded_checksums_translated_under_ignore_policy() {
        let offloaded = |seq| {
            let mut f = frame(false, true, seq, Some(1), TcpControl::None, [None; 3], b"abc");
            f[14 + 20 + 16] ^= 0x5a; // checksum left to the NIC
            f
        };
        let mut strict = SequenceRewriter::default();
        strict.set_delta(tcp(&frame(false, true, 0, None, TcpControl::None, [None; 3], b"")).flow, 100);
        assert_eq!(strict.rewrite_svm_output(&mut offloaded(5)), RewriteOutcome::NotTcp);
        let mut r = SequenceRewriter::new(ChecksumFix::Full).with_checksum_policy(ChecksumPolicy::Ignore);
        r.set_delta(tcp(&frame(false, true, 0, None, TcpControl::None, [None; 3], b"")).flow, 100);
        let mut f = offloaded(5);
        assert_eq!(r.rewrite_svm_output(&mut f), RewriteOutcome::Rewritten);
        assert_eq!(tcp(&f).tcp().map(|t| t.seq), Some(105));
    }
}
