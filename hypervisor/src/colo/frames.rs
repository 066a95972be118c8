//! Building well-formed Ethernet frames with smoltcp's wire emitters (checksums included): the
//! traffic tests and benchmarks feed the comparator, and the frames the hypervisor itself sends.
#![deny(unsafe_code)]

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::phy::ChecksumCapabilities;
use smoltcp::wire::{
    EthernetAddress, EthernetFrame, EthernetProtocol, EthernetRepr, IpProtocol, Ipv4Address, Ipv4Packet, Ipv4Repr,
    TcpControl, TcpPacket, TcpRepr, TcpSeqNumber, UdpPacket, UdpRepr,
};

/// The source MAC of built frames.
pub const SRC_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 1]);
/// The destination MAC of built frames.
pub const DST_MAC: EthernetAddress = EthernetAddress([2, 0, 0, 0, 0, 2]);
const ETHERNET_HEADER: usize = 14;
const IPV4_HEADER: usize = 20;

/// An Ethernet + IPv4 frame from `src` to `dst` carrying `l4_len` bytes of protocol `proto`,
/// which `fill` writes (it gets exactly the L4 bytes).
pub fn ipv4_frame(
    src: Ipv4Address,
    dst: Ipv4Address,
    proto: IpProtocol,
    l4_len: usize,
    fill: impl FnOnce(&mut [u8]),
) -> Vec<u8> {
    let mut buf = vec![0u8; ETHERNET_HEADER + IPV4_HEADER + l4_len];
    EthernetRepr { src_addr: SRC_MAC, dst_addr: DST_MAC, ethertype: EthernetProtocol::Ipv4 }
        .emit(&mut EthernetFrame::new_unchecked(&mut buf[..]));
    let ip = Ipv4Repr { src_addr: src, dst_addr: dst, next_header: proto, payload_len: l4_len, hop_limit: 64 };
    let mut packet = Ipv4Packet::new_unchecked(&mut buf[ETHERNET_HEADER..]);
    ip.emit(&mut packet, &ChecksumCapabilities::default());
    fill(packet.payload_mut());
    buf
}

/// A TCP segment description (no options).
pub fn tcp_repr<'a>(
    ports: (u16, u16),
    seq: u32,
    ack: Option<u32>,
    control: TcpControl,
    window: u16,
    payload: &'a [u8],
) -> TcpRepr<'a> {
    TcpRepr {
        src_port: ports.0,
        dst_port: ports.1,
        control,
        seq_number: TcpSeqNumber(seq as i32),
        ack_number: ack.map(|a| TcpSeqNumber(a as i32)),
        window_len: window,
        window_scale: None,
        max_seg_size: None,
        sack_permitted: false,
        sack_ranges: [None; 3],
        timestamp: None,
        payload,
    }
}

/// A TCP/IPv4 frame.
pub fn tcp_v4(src: Ipv4Address, dst: Ipv4Address, repr: &TcpRepr<'_>) -> Vec<u8> {
    ipv4_frame(src, dst, IpProtocol::Tcp, repr.buffer_len(), |l4| {
        repr.emit(&mut TcpPacket::new_unchecked(l4), &src.into(), &dst.into(), &ChecksumCapabilities::default())
    })
}

/// A UDP/IPv4 frame.
pub fn udp_v4(src: Ipv4Address, dst: Ipv4Address, ports: (u16, u16), payload: &[u8]) -> Vec<u8> {
    ipv4_frame(src, dst, IpProtocol::Udp, 8 + payload.len(), |l4| {
        UdpRepr { src_port: ports.0, dst_port: ports.1 }.emit(
            &mut UdpPacket::new_unchecked(l4),
            &src.into(),
            &dst.into(),
            payload.len(),
            |p| p.copy_from_slice(payload),
            &ChecksumCapabilities::default(),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::colo::packet::parse_frame;

    #[test]
    fn built_frames_parse_with_valid_checksums() {
        let (a, b) = (Ipv4Address::new(10, 0, 0, 1), Ipv4Address::new(10, 0, 0, 2));
        let f = tcp_v4(a, b, &tcp_repr((80, 4000), 7, Some(1), TcpControl::Psh, 1000, b"hi"));
        let t = parse_frame(&f).tcp().cloned().expect("TCP with a valid checksum");
        assert_eq!((t.seq, t.ack), (7, 1));
        assert_eq!(&f[t.payload], b"hi");
        assert!(parse_frame(&udp_v4(a, b, (5, 9), b"x")).parse_error().is_none());
    }
}
