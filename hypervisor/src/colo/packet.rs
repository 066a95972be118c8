//! Frame parsing for the comparator and the sequence rewriter.
//!
//! "Parse, don't validate": a raw Ethernet frame goes through smoltcp's `wire` module once and
//! comes out as a typed [`ParsedFrame`]: a [`FlowKey`] naming the flow (protocol, addresses,
//! ports or ICMP echo identifier), a [`FrameClass`] (TCP with its [`TcpSegment`] header facts, or
//! one of the datagram kinds), and the byte range the comparator compares.
//!
//! A frame that cannot be parsed (truncated, bad lengths, bad checksum where one is checked)
//! is never an error for the caller and never a panic: it is classified
//! [`FrameClass::Opaque`] with a named [`ParseError`], compared as a whole-frame datagram, and
//! counted by the caller.
//!
//! Supported: Ethernet II; ARP; IPv4 (fragments are classified [`FrameClass::Fragment`]); IPv6
//! whose first next-header is TCP, UDP or ICMPv6 (extension headers make it
//! [`FrameClass::OtherIp`]); TCP; UDP; ICMPv4; ICMPv6.

use core::ops::Range;

use smoltcp::wire::{
    ArpPacket, EthernetFrame, EthernetProtocol, Icmpv4Message, Icmpv4Packet, Icmpv6Message, Icmpv6Packet, IpAddress,
    IpProtocol, Ipv4Packet, Ipv6Packet, TcpPacket, UdpPacket,
};

/// Why a frame could not be parsed. The frame is still handled, as [`FrameClass::Opaque`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ParseError {
    /// Shorter than an Ethernet header.
    EthernetTruncated,
    /// ARP ethertype but the ARP packet is truncated.
    ArpTruncated,
    /// IPv4 ethertype but the header is truncated or its lengths are inconsistent.
    Ipv4Header,
    /// IPv4 ethertype but the version field is not 4.
    Ipv4Version,
    /// IPv4 header checksum is wrong.
    Ipv4Checksum,
    /// IPv6 ethertype but the header is truncated, the payload length exceeds the frame, or the
    /// version field is not 6.
    Ipv6Header,
    /// TCP header truncated or data offset invalid.
    TcpHeader,
    /// TCP checksum is wrong.
    TcpChecksum,
    /// UDP header truncated or length field inconsistent.
    UdpHeader,
    /// UDP checksum is wrong.
    UdpChecksum,
    /// ICMPv4 message truncated.
    Icmpv4Header,
    /// ICMPv4 checksum is wrong.
    Icmpv4Checksum,
    /// ICMPv6 message truncated.
    Icmpv6Header,
    /// ICMPv6 checksum is wrong.
    Icmpv6Checksum,
}

impl ParseError {
    /// Every variant, for per-reason counters.
    pub const ALL: [ParseError; 14] = [
        ParseError::EthernetTruncated,
        ParseError::ArpTruncated,
        ParseError::Ipv4Header,
        ParseError::Ipv4Version,
        ParseError::Ipv4Checksum,
        ParseError::Ipv6Header,
        ParseError::TcpHeader,
        ParseError::TcpChecksum,
        ParseError::UdpHeader,
        ParseError::UdpChecksum,
        ParseError::Icmpv4Header,
        ParseError::Icmpv4Checksum,
        ParseError::Icmpv6Header,
        ParseError::Icmpv6Checksum,
    ];

    /// Dense index of this variant in [`ParseError::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// Transport / link protocol of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlowProto {
    /// TCP (the only stream protocol).
    Tcp,
    /// UDP.
    Udp,
    /// ICMPv4.
    Icmpv4,
    /// ICMPv6.
    Icmpv6,
    /// ARP.
    Arp,
    /// IPv4 fragment (not the whole datagram), keyed by addresses, protocol and the IP
    /// identification (in [`FlowKey::src_port`]).
    Fragment(u8),
    /// Any other IP protocol (or IPv6 with extension headers), keyed by addresses and protocol.
    OtherIp(u8),
    /// Any other ethertype.
    OtherEther(u16),
    /// Unparseable frames: one flow for all of them.
    Opaque,
}

/// A network-layer address in a flow key (fixed-size bytes, cheap to order and hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlowAddr {
    /// No network address (opaque, unknown ethertype).
    None,
    /// IPv4 address bytes.
    V4([u8; 4]),
    /// IPv6 address bytes.
    V6([u8; 16]),
}

impl FlowAddr {
    fn from_ip(addr: IpAddress) -> FlowAddr {
        match addr {
            IpAddress::Ipv4(a) => FlowAddr::V4(a.octets()),
            IpAddress::Ipv6(a) => FlowAddr::V6(a.octets()),
        }
    }
}

/// Names one flow: protocol, source and destination address, ports (TCP/UDP) or ICMP echo
/// identifier (in `src_port`, `dst_port` 0). For frames a VM sends to clients, `src` is the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    /// Protocol.
    pub proto: FlowProto,
    /// Source address.
    pub src: FlowAddr,
    /// Destination address.
    pub dst: FlowAddr,
    /// Source port, or ICMP echo identifier.
    pub src_port: u16,
    /// Destination port.
    pub dst_port: u16,
}

impl FlowKey {
    /// The single flow all opaque frames belong to.
    pub const OPAQUE: FlowKey =
        FlowKey { proto: FlowProto::Opaque, src: FlowAddr::None, dst: FlowAddr::None, src_port: 0, dst_port: 0 };

    /// The same flow seen from the other end (source and destination swapped).
    pub fn reversed(&self) -> FlowKey {
        FlowKey { proto: self.proto, src: self.dst, dst: self.src, src_port: self.dst_port, dst_port: self.src_port }
    }
}

bitflags::bitflags! {
    /// The TCP control flags the COLO engine cares about.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct TcpFlags: u8 {
        /// FIN.
        const FIN = 0x01;
        /// SYN.
        const SYN = 0x02;
        /// RST.
        const RST = 0x04;
        /// PSH (ignored by comparison).
        const PSH = 0x08;
        /// ACK.
        const ACK = 0x10;
    }
}

/// Header facts of one TCP segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpSegment {
    /// Sequence number.
    pub seq: u32,
    /// Acknowledgement number (meaningful only with [`TcpFlags::ACK`]).
    pub ack: u32,
    /// Control flags.
    pub flags: TcpFlags,
    /// Advertised window (unscaled).
    pub window: u16,
    /// Offset of the TCP header in the frame.
    pub header_offset: usize,
    /// Where the TCP payload lies in the frame.
    pub payload: Range<usize>,
}

impl TcpSegment {
    /// Payload length in bytes.
    pub fn payload_len(&self) -> usize {
        self.payload.len()
    }

    /// Sequence space this segment occupies (payload + SYN + FIN).
    pub fn seq_len(&self) -> u32 {
        let mut n = self.payload.len() as u32;
        if self.flags.contains(TcpFlags::SYN) {
            n = n.wrapping_add(1);
        }
        if self.flags.contains(TcpFlags::FIN) {
            n = n.wrapping_add(1);
        }
        n
    }

    /// No payload and no SYN/FIN/RST: a pure ACK or window update.
    pub fn is_pure_ack(&self) -> bool {
        self.payload.is_empty() && !self.flags.intersects(TcpFlags::SYN | TcpFlags::FIN | TcpFlags::RST)
    }
}

/// Network layer of an IP frame, for the rewriter's checksum fix-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetLayer {
    /// Not IP.
    None,
    /// IPv4, header at this frame offset.
    V4 {
        /// Offset of the IPv4 header.
        offset: usize,
    },
    /// IPv6, header at this frame offset.
    V6 {
        /// Offset of the IPv6 header.
        offset: usize,
    },
}

/// What a frame is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameClass {
    /// A TCP segment (compared as a byte stream).
    Tcp(TcpSegment),
    /// UDP datagram (compared as a datagram: ports + payload).
    Udp,
    /// ICMPv4 or ICMPv6 message (compared as the whole ICMP message).
    Icmp,
    /// ARP packet (compared as the whole ARP packet).
    Arp,
    /// IPv4 fragment (compared from the IPv4 flags / fragment offset field to the end, so the
    /// offset and the more-fragments flag are compared with the payload).
    Fragment,
    /// Other IP protocol (compared as the IP payload).
    OtherIp,
    /// Other ethertype (compared as the Ethernet payload).
    OtherEther,
    /// Unparseable (compared as the whole frame).
    Opaque(ParseError),
}

/// Result of parsing one Ethernet frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedFrame {
    /// The flow this frame belongs to.
    pub flow: FlowKey,
    /// What it is.
    pub class: FrameClass,
    /// Bytes of the frame the comparator compares for datagrams (for TCP: the payload).
    pub content: Range<usize>,
    /// Where the IP header is.
    pub net: NetLayer,
}

impl ParsedFrame {
    /// The TCP segment, if this is TCP.
    pub fn tcp(&self) -> Option<&TcpSegment> {
        match &self.class {
            FrameClass::Tcp(t) => Some(t),
            _ => None,
        }
    }

    /// The parse error, if opaque.
    pub fn parse_error(&self) -> Option<ParseError> {
        match self.class {
            FrameClass::Opaque(e) => Some(e),
            _ => None,
        }
    }

    fn opaque(frame: &[u8], err: ParseError) -> ParsedFrame {
        ParsedFrame {
            flow: FlowKey::OPAQUE,
            class: FrameClass::Opaque(err),
            content: 0..frame.len(),
            net: NetLayer::None,
        }
    }
}

/// Whether transport and IPv4 header checksums are verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumPolicy {
    /// Verify every checksum smoltcp can check (the default).
    Verify,
    /// Skip checksum verification (guests using checksum offload).
    Ignore,
}

/// Parse a frame, verifying checksums.
pub fn parse_frame(frame: &[u8]) -> ParsedFrame {
    parse_frame_with(frame, ChecksumPolicy::Verify)
}

/// Parse a frame with an explicit checksum policy. Never panics.
pub fn parse_frame_with(frame: &[u8], policy: ChecksumPolicy) -> ParsedFrame {
    match parse_inner(frame, policy) {
        Ok(p) => p,
        Err(e) => ParsedFrame::opaque(frame, e),
    }
}

const ETH_HDR: usize = 14;

fn parse_inner(frame: &[u8], policy: ChecksumPolicy) -> Result<ParsedFrame, ParseError> {
    let eth = EthernetFrame::new_checked(frame).map_err(|_| ParseError::EthernetTruncated)?;
    let payload = eth.payload();
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            let arp = ArpPacket::new_checked(payload).map_err(|_| ParseError::ArpTruncated)?;
            let src = match <[u8; 4]>::try_from(arp.source_protocol_addr()) {
                Ok(a) => FlowAddr::V4(a),
                Err(_) => FlowAddr::None,
            };
            let len = 8 + 2 * (arp.hardware_len() as usize + arp.protocol_len() as usize);
            Ok(ParsedFrame {
                flow: FlowKey { proto: FlowProto::Arp, src, dst: FlowAddr::None, src_port: 0, dst_port: 0 },
                class: FrameClass::Arp,
                content: ETH_HDR..ETH_HDR + len,
                net: NetLayer::None,
            })
        }
        EthernetProtocol::Ipv4 => parse_ipv4(frame, payload, policy),
        EthernetProtocol::Ipv6 => parse_ipv6(frame, payload, policy),
        EthernetProtocol::Unknown(t) => Ok(ParsedFrame {
            flow: FlowKey { proto: FlowProto::OtherEther(t), ..FlowKey::OPAQUE },
            class: FrameClass::OtherEther,
            content: ETH_HDR..frame.len(),
            net: NetLayer::None,
        }),
    }
}

fn parse_ipv4(frame: &[u8], payload: &[u8], policy: ChecksumPolicy) -> Result<ParsedFrame, ParseError> {
    let ip = Ipv4Packet::new_checked(payload).map_err(|_| ParseError::Ipv4Header)?;
    if ip.version() != 4 || (ip.header_len() as usize) < 20 {
        return Err(ParseError::Ipv4Version);
    }
    if policy == ChecksumPolicy::Verify && !ip.verify_checksum() {
        return Err(ParseError::Ipv4Checksum);
    }
    let src = IpAddress::Ipv4(ip.src_addr());
    let dst = IpAddress::Ipv4(ip.dst_addr());
    let l4_off = ETH_HDR + ip.header_len() as usize;
    let l4 = ip.payload();
    let proto = ip.next_header();
    let net = NetLayer::V4 { offset: ETH_HDR };
    if ip.more_frags() || ip.frag_offset() != 0 {
        // Fragments of different datagrams differ by identification; within one datagram by
        // offset and MF flag, which the compared content therefore starts with (bytes 6..8 of
        // the IPv4 header: flags and fragment offset; then TTL, protocol, checksum, addresses,
        // options and the fragment's data).
        return Ok(ParsedFrame {
            flow: FlowKey {
                proto: FlowProto::Fragment(u8::from(proto)),
                src: FlowAddr::from_ip(src),
                dst: FlowAddr::from_ip(dst),
                src_port: ip.ident(),
                dst_port: 0,
            },
            class: FrameClass::Fragment,
            content: ETH_HDR + 6..l4_off + l4.len(),
            net,
        });
    }
    parse_l4(frame, proto, src, dst, l4_off, l4, net, policy)
}

fn parse_ipv6(frame: &[u8], payload: &[u8], policy: ChecksumPolicy) -> Result<ParsedFrame, ParseError> {
    let ip = Ipv6Packet::new_checked(payload).map_err(|_| ParseError::Ipv6Header)?;
    if ip.version() != 6 {
        return Err(ParseError::Ipv6Header);
    }
    let src = IpAddress::Ipv6(ip.src_addr());
    let dst = IpAddress::Ipv6(ip.dst_addr());
    let l4_off = ETH_HDR + 40;
    parse_l4(frame, ip.next_header(), src, dst, l4_off, ip.payload(), NetLayer::V6 { offset: ETH_HDR }, policy)
}

#[allow(clippy::too_many_arguments)]
fn parse_l4(
    frame: &[u8],
    proto: IpProtocol,
    src: IpAddress,
    dst: IpAddress,
    l4_off: usize,
    l4: &[u8],
    net: NetLayer,
    policy: ChecksumPolicy,
) -> Result<ParsedFrame, ParseError> {
    let verify = policy == ChecksumPolicy::Verify;
    let mut flow = FlowKey {
        proto: FlowProto::OtherIp(u8::from(proto)),
        src: FlowAddr::from_ip(src),
        dst: FlowAddr::from_ip(dst),
        src_port: 0,
        dst_port: 0,
    };
    let _ = frame;
    match proto {
        IpProtocol::Tcp => {
            let tcp = TcpPacket::new_checked(l4).map_err(|_| ParseError::TcpHeader)?;
            if verify && !tcp.verify_checksum(&src, &dst) {
                return Err(ParseError::TcpChecksum);
            }
            let mut flags = TcpFlags::empty();
            flags.set(TcpFlags::FIN, tcp.fin());
            flags.set(TcpFlags::SYN, tcp.syn());
            flags.set(TcpFlags::RST, tcp.rst());
            flags.set(TcpFlags::PSH, tcp.psh());
            flags.set(TcpFlags::ACK, tcp.ack());
            let hl = tcp.header_len() as usize;
            flow.proto = FlowProto::Tcp;
            flow.src_port = tcp.src_port();
            flow.dst_port = tcp.dst_port();
            let payload = l4_off + hl..l4_off + l4.len();
            Ok(ParsedFrame {
                flow,
                class: FrameClass::Tcp(TcpSegment {
                    seq: tcp.seq_number().0 as u32,
                    ack: tcp.ack_number().0 as u32,
                    flags,
                    window: tcp.window_len(),
                    header_offset: l4_off,
                    payload: payload.clone(),
                }),
                content: payload,
                net,
            })
        }
        IpProtocol::Udp => {
            let udp = UdpPacket::new_checked(l4).map_err(|_| ParseError::UdpHeader)?;
            if verify && !udp.verify_checksum(&src, &dst) {
                return Err(ParseError::UdpChecksum);
            }
            flow.proto = FlowProto::Udp;
            flow.src_port = udp.src_port();
            flow.dst_port = udp.dst_port();
            // Ports are in the flow key; compare the payload as the datagram content.
            let end = l4_off + udp.len() as usize;
            Ok(ParsedFrame { flow, class: FrameClass::Udp, content: l4_off + 8..end, net })
        }
        IpProtocol::Icmp => {
            let icmp = Icmpv4Packet::new_checked(l4).map_err(|_| ParseError::Icmpv4Header)?;
            if verify && !icmp.verify_checksum() {
                return Err(ParseError::Icmpv4Checksum);
            }
            flow.proto = FlowProto::Icmpv4;
            if matches!(icmp.msg_type(), Icmpv4Message::EchoRequest | Icmpv4Message::EchoReply) {
                flow.src_port = icmp.echo_ident();
            }
            Ok(ParsedFrame { flow, class: FrameClass::Icmp, content: l4_off..l4_off + l4.len(), net })
        }
        IpProtocol::Icmpv6 => {
            let icmp = Icmpv6Packet::new_checked(l4).map_err(|_| ParseError::Icmpv6Header)?;
            if let (IpAddress::Ipv6(s), IpAddress::Ipv6(d)) = (src, dst) {
                if verify && !icmp.verify_checksum(&s, &d) {
                    return Err(ParseError::Icmpv6Checksum);
                }
            }
            flow.proto = FlowProto::Icmpv6;
            if matches!(icmp.msg_type(), Icmpv6Message::EchoRequest | Icmpv6Message::EchoReply) {
                flow.src_port = icmp.echo_ident();
            }
            Ok(ParsedFrame { flow, class: FrameClass::Icmp, content: l4_off..l4_off + l4.len(), net })
        }
        _ => Ok(ParsedFrame { flow, class: FrameClass::OtherIp, content: l4_off..l4_off + l4.len(), net }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use smoltcp::phy::ChecksumCapabilities;
    use smoltcp::wire::{
        EthernetRepr, Icmpv4Repr, Ipv4Address, Ipv4Repr, Ipv6Address, Ipv6Repr, TcpControl, TcpRepr, TcpSeqNumber,
        UdpRepr,
    };

    const A: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
    const B: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);

    fn eth(buf: &mut [u8], ty: EthernetProtocol) {
        let mut f = EthernetFrame::new_unchecked(buf);
        EthernetRepr { src_addr: crate::colo::frames::SRC_MAC, dst_addr: crate::colo::frames::DST_MAC, ethertype: ty }
            .emit(&mut f);
    }

    pub(crate) fn tcp4(seq: u32, ack: Option<u32>, ctl: TcpControl, payload: &[u8]) -> Vec<u8> {
        crate::colo::frames::tcp_v4(A, B, &crate::colo::frames::tcp_repr((80, 4000), seq, ack, ctl, 1000, payload))
    }

    #[test]
    fn tcp_v4_parses_flow_and_segment() {
        let f = tcp4(1000, Some(7), TcpControl::Psh, b"hello");
        let p = parse_frame(&f);
        assert_eq!(p.flow.proto, FlowProto::Tcp);
        assert_eq!(p.flow.src, FlowAddr::V4([10, 0, 0, 1]));
        assert_eq!((p.flow.src_port, p.flow.dst_port), (80, 4000));
        let t = p.tcp().unwrap();
        assert_eq!(t.seq, 1000);
        assert_eq!(t.ack, 7);
        assert!(t.flags.contains(TcpFlags::ACK | TcpFlags::PSH));
        assert_eq!(&f[t.payload.clone()], b"hello");
        assert_eq!(t.seq_len(), 5);
    }

    #[test]
    fn tcp_syn_fin_seq_len() {
        let f = tcp4(1, None, TcpControl::Syn, b"");
        let t = parse_frame(&f).tcp().unwrap().clone();
        assert_eq!(t.seq_len(), 1);
        assert!(!t.is_pure_ack());
        let f = tcp4(1, Some(2), TcpControl::None, b"");
        assert!(parse_frame(&f).tcp().unwrap().is_pure_ack());
    }

    #[test]
    fn bad_tcp_checksum_is_opaque() {
        let mut f = tcp4(1000, Some(7), TcpControl::Psh, b"hello");
        let n = f.len();
        f[n - 1] ^= 0xff;
        let p = parse_frame(&f);
        assert_eq!(p.parse_error(), Some(ParseError::TcpChecksum));
        assert_eq!(p.flow, FlowKey::OPAQUE);
        assert_eq!(p.content, 0..n);
        // With checksum verification off it parses.
        assert!(parse_frame_with(&f, ChecksumPolicy::Ignore).tcp().is_some());
    }

    #[test]
    fn bad_ipv4_checksum_is_opaque() {
        let mut f = tcp4(1000, Some(7), TcpControl::Psh, b"hello");
        f[14 + 8] ^= 1; // TTL
        assert_eq!(parse_frame(&f).parse_error(), Some(ParseError::Ipv4Checksum));
    }

    #[test]
    fn truncated_frames_are_opaque() {
        let f = tcp4(1000, Some(7), TcpControl::Psh, b"hello");
        assert_eq!(parse_frame(&f[..10]).parse_error(), Some(ParseError::EthernetTruncated));
        assert_eq!(parse_frame(&f[..20]).parse_error(), Some(ParseError::Ipv4Header));
        assert_eq!(parse_frame(&f[..f.len() - 2]).parse_error(), Some(ParseError::Ipv4Header));
    }

    #[test]
    fn udp_v4_and_padding() {
        let repr = UdpRepr { src_port: 53, dst_port: 5353 };
        let payload = b"dns";
        let ip = Ipv4Repr {
            src_addr: A,
            dst_addr: B,
            next_header: IpProtocol::Udp,
            payload_len: 8 + payload.len(),
            hop_limit: 64,
        };
        // Ethernet minimum frame padding after the IP datagram must be ignored.
        let mut buf = vec![0u8; 60];
        eth(&mut buf, EthernetProtocol::Ipv4);
        let caps = ChecksumCapabilities::default();
        let mut p = Ipv4Packet::new_unchecked(&mut buf[14..]);
        ip.emit(&mut p, &caps);
        let mut u = UdpPacket::new_unchecked(p.payload_mut());
        repr.emit(&mut u, &A.into(), &B.into(), payload.len(), |b| b.copy_from_slice(payload), &caps);
        let pf = parse_frame(&buf);
        assert_eq!(pf.class, FrameClass::Udp);
        assert_eq!(pf.flow.src_port, 53);
        assert_eq!(&buf[pf.content.clone()], b"dns");
    }

    #[test]
    fn icmpv4_echo_keyed_by_ident() {
        let data = b"ping";
        let repr = Icmpv4Repr::EchoReply { ident: 0x1234, seq_no: 1, data };
        let ip = Ipv4Repr {
            src_addr: A,
            dst_addr: B,
            next_header: IpProtocol::Icmp,
            payload_len: repr.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; 14 + 20 + repr.buffer_len()];
        eth(&mut buf, EthernetProtocol::Ipv4);
        let caps = ChecksumCapabilities::default();
        let mut p = Ipv4Packet::new_unchecked(&mut buf[14..]);
        ip.emit(&mut p, &caps);
        let mut i = Icmpv4Packet::new_unchecked(p.payload_mut());
        repr.emit(&mut i, &caps);
        let pf = parse_frame(&buf);
        assert_eq!(pf.class, FrameClass::Icmp);
        assert_eq!(pf.flow.proto, FlowProto::Icmpv4);
        assert_eq!(pf.flow.src_port, 0x1234);
    }

    #[test]
    fn tcp_v6_parses() {
        let s = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
        let d = Ipv6Address::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
        let repr = TcpRepr {
            src_port: 443,
            dst_port: 5000,
            control: TcpControl::None,
            seq_number: TcpSeqNumber(5),
            ack_number: Some(TcpSeqNumber(9)),
            window_len: 10,
            window_scale: None,
            max_seg_size: None,
            sack_permitted: false,
            sack_ranges: [None; 3],
            timestamp: None,
            payload: b"v6",
        };
        let ip = Ipv6Repr {
            src_addr: s,
            dst_addr: d,
            next_header: IpProtocol::Tcp,
            payload_len: repr.buffer_len(),
            hop_limit: 64,
        };
        let mut buf = vec![0u8; 14 + 40 + repr.buffer_len()];
        eth(&mut buf, EthernetProtocol::Ipv6);
        let mut p = Ipv6Packet::new_unchecked(&mut buf[14..]);
        ip.emit(&mut p);
        let mut t = TcpPacket::new_unchecked(p.payload_mut());
        repr.emit(&mut t, &s.into(), &d.into(), &ChecksumCapabilities::default());
        let pf = parse_frame(&buf);
        assert_eq!(pf.net, NetLayer::V6 { offset: 14 });
        let t = pf.tcp().unwrap();
        assert_eq!(t.seq, 5);
        assert_eq!(&buf[t.payload.clone()], b"v6");
        let n = buf.len();
        buf[n - 1] ^= 1;
        assert_eq!(parse_frame(&buf).parse_error(), Some(ParseError::TcpChecksum));
    }

    #[test]
    fn unknown_ethertype_is_other() {
        let mut buf = vec![0u8; 30];
        eth(&mut buf, EthernetProtocol::Unknown(0x88b5));
        let pf = parse_frame(&buf);
        assert_eq!(pf.class, FrameClass::OtherEther);
        assert_eq!(pf.flow.proto, FlowProto::OtherEther(0x88b5));
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut x: u32 = 12345;
        for len in 0..200usize {
            let mut buf = vec![0u8; len];
            for b in buf.iter_mut() {
                x = x.wrapping_mul(1664525).wrapping_add(1013904223);
                *b = (x >> 24) as u8;
            }
            if len > 13 {
                buf[12] = 0x08;
                buf[13] = if len % 2 == 0 { 0x00 } else { 0x06 };
            }
            let _ = parse_frame(&buf);
            let _ = parse_frame_with(&buf, ChecksumPolicy::Ignore);
        }
    }

    fn fragment(ident: u16, offset_units: u16, more: bool, payload: &[u8]) -> Vec<u8> {
        let mut f = crate::colo::frames::ipv4_frame(A, B, smoltcp::wire::IpProtocol::Udp, payload.len(), |b| {
            b.copy_from_slice(payload)
        });
        let mut ip = smoltcp::wire::Ipv4Packet::new_unchecked(&mut f[14..]);
        ip.set_ident(ident);
        ip.set_more_frags(more);
        ip.set_frag_offset(offset_units * 8);
        ip.fill_checksum();
        f
    }

    /// Issue 15, item 11: fragments at offset 0 and at offset 8 (same bytes) differ, and so do
    /// fragments of different datagrams (identification).
    #[test]
    fn fragments_keyed_by_ident_and_compared_with_offset() {
        let a = parse_frame(&fragment(7, 0, true, b"12345678"));
        let b = parse_frame(&fragment(7, 1, false, b"12345678"));
        assert_eq!(a.class, FrameClass::Fragment);
        assert_eq!(a.flow, b.flow);
        assert_eq!(a.flow.src_port, 7);
        let fa = fragment(7, 0, true, b"12345678");
        let fb = fragment(7, 1, false, b"12345678");
        assert_ne!(&fa[a.content.clone()], &fb[b.content.clone()]);
        let c = parse_frame(&fragment(8, 0, true, b"12345678"));
        assert_ne!(a.flow, c.flow);
        // And in the comparator: not a match.
        let mut cmp = crate::colo::comparator::OutputComparator::new(Default::default());
        use crate::colo::comparator::Verdict;
        use crate::colo::Tick;
        assert_eq!(cmp.push_pvm(&fa, Tick(0)), Verdict::Held);
        assert_eq!(cmp.push_svm(&fb, Tick(0)), Verdict::Buffered);
        assert_eq!(cmp.push_svm(&fa, Tick(0)), Verdict::Matched);
    }
}
