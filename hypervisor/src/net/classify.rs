//! Classification of received frames before the local stack sees them: for the local stack,
//! for a guest, unwanted, or malformed (see `net::iface`). Pure, host-tested.
#![deny(unsafe_code)]

use smoltcp::wire::{
    ArpPacket, EthernetAddress, EthernetFrame, EthernetProtocol, Icmpv4Packet, IpAddress, IpProtocol, Ipv4Packet,
    TcpPacket, UdpPacket,
};

/// The verdict on one received frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// For the local stack (and, when `also_guests`, for the hook too: broadcast/multicast).
    Local {
        /// Also hand it to the guest hook.
        also_guests: bool,
    },
    /// Unicast to a guest's MAC.
    Guest,
    /// Nobody wants it.
    Dropped,
    /// Malformed.
    Malformed,
}

/// Classifies a frame (see the module documentation).
///
/// `own` is the NIC's MAC; `guest_owns` is `None` without a guest hook, else the hook's test for
/// a guest MAC.
pub fn classify(frame: &[u8], own: [u8; 6], guest_owns: Option<&dyn Fn([u8; 6]) -> bool>) -> Verdict {
    let own = EthernetAddress(own);
    let hook = guest_owns;
    let Ok(eth) = EthernetFrame::new_checked(frame) else {
        return Verdict::Malformed;
    };
    let dst = eth.dst_addr();
    let group = !dst.is_unicast();
    if !group && dst != own {
        return if hook.is_some_and(|owns| owns(dst.0)) { Verdict::Guest } else { Verdict::Dropped };
    }
    let also_guests = group && hook.is_some();
    match eth.ethertype() {
        EthernetProtocol::Arp => {
            if ArpPacket::new_checked(eth.payload()).is_err() {
                return Verdict::Malformed;
            }
        }
        EthernetProtocol::Ipv4 => {
            if !ipv4_well_formed(eth.payload()) {
                return Verdict::Malformed;
            }
        }
        EthernetProtocol::Ipv6 => {}
        _ => return if also_guests { Verdict::Local { also_guests } } else { Verdict::Dropped },
    }
    Verdict::Local { also_guests }
}

fn ipv4_well_formed(bytes: &[u8]) -> bool {
    let Ok(ip) = Ipv4Packet::new_checked(bytes) else {
        return false;
    };
    if ip.version() != 4 || !ip.verify_checksum() {
        return false;
    }
    // Fragments are checked only at the IP level.
    if ip.more_frags() || ip.frag_offset() != 0 {
        return true;
    }
    let (src, dst) = (IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()));
    let payload = ip.payload();
    match ip.next_header() {
        IpProtocol::Tcp => TcpPacket::new_checked(payload).is_ok_and(|p| p.verify_checksum(&src, &dst)),
        IpProtocol::Udp => UdpPacket::new_checked(payload).is_ok_and(|p| p.verify_checksum(&src, &dst)),
        IpProtocol::Icmp => Icmpv4Packet::new_checked(payload).is_ok_and(|p| p.verify_checksum()),
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: [u8; 6] = [0x52, 0x54, 0, 0x77, 0, 2];
    const GUEST: [u8; 6] = [0x52, 0x54, 0, 0x77, 0, 9];

    fn csum(b: &[u8]) -> u16 {
        let mut t: u32 = b.chunks(2).map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0))).sum();
        while t >> 16 != 0 {
            t = (t & 0xffff) + (t >> 16);
        }
        !(t as u16)
    }

    fn eth(dst: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[2, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.extend_from_slice(payload);
        while f.len() < 60 {
            f.push(0);
        }
        f
    }

    fn icmp_echo() -> Vec<u8> {
        let mut m = vec![8, 0, 0, 0, 0, 1, 0, 1];
        m.extend_from_slice(b"0123456789abcdef");
        let c = csum(&m);
        m[2..4].copy_from_slice(&c.to_be_bytes());
        m
    }

    fn ipv4(payload: &[u8], version: u8, total: Option<u16>, good: bool) -> Vec<u8> {
        let total = total.unwrap_or(20 + payload.len() as u16);
        let mut h = vec![version << 4 | 5, 0, 0, 0, 0, 1, 0, 0, 64, 1, 0, 0, 10, 77, 0, 1, 10, 77, 0, 2];
        h[2..4].copy_from_slice(&total.to_be_bytes());
        let c = csum(&h) ^ if good { 0 } else { 0x5555 };
        h[10..12].copy_from_slice(&c.to_be_bytes());
        h.extend_from_slice(payload);
        h
    }

    #[test]
    fn well_formed_frames_go_to_the_local_stack() {
        let ping = eth(OWN, 0x0800, &ipv4(&icmp_echo(), 4, None, true));
        assert_eq!(classify(&ping, OWN, None), Verdict::Local { also_guests: false });
        let arp = eth(
            [0xff; 6],
            0x0806,
            &[0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 77, 0, 1, 0, 0, 0, 0, 0, 0, 10, 77, 0, 2],
        );
        assert_eq!(classify(&arp, OWN, None), Verdict::Local { also_guests: false });
        assert_eq!(classify(&arp, OWN, Some(&|_| false)), Verdict::Local { also_guests: true });
    }

    #[test]
    fn malformed_frames_are_named_malformed() {
        let mut bad_icmp = icmp_echo();
        bad_icmp[2] ^= 0xff;
        for (what, frame) in [
            ("runt", vec![0u8; 10]),
            ("bad header checksum", eth(OWN, 0x0800, &ipv4(&icmp_echo(), 4, None, false))),
            ("IHL beyond frame", eth(OWN, 0x0800, &[0x4f, 0, 0, 0, 0, 0, 0, 0, 0, 0])),
            ("total length beyond frame", eth(OWN, 0x0800, &ipv4(&icmp_echo(), 4, Some(1400), true))),
            ("version 6 in IPv4", eth(OWN, 0x0800, &ipv4(&icmp_echo(), 6, None, true))),
            ("bad ICMP checksum", eth(OWN, 0x0800, &ipv4(&bad_icmp, 4, None, true))),
            ("absurd ARP lengths", eth(OWN, 0x0806, &[0, 1, 8, 0, 200, 200, 0, 1])),
        ] {
            assert_eq!(classify(&frame, OWN, None), Verdict::Malformed, "{what}");
        }
    }

    #[test]
    fn unwanted_and_guest_frames_are_routed() {
        let other = eth([2, 0, 0, 0, 0, 0x99], 0x0800, &ipv4(&icmp_echo(), 4, None, true));
        assert_eq!(classify(&other, OWN, None), Verdict::Dropped);
        let unknown = eth(OWN, 0x88b5, b"garbage");
        assert_eq!(classify(&unknown, OWN, None), Verdict::Dropped);
        let to_guest = eth(GUEST, 0x0800, &[0xde, 0xad]);
        assert_eq!(classify(&to_guest, OWN, Some(&|mac| mac == GUEST)), Verdict::Guest);
        assert_eq!(classify(&to_guest, OWN, None), Verdict::Dropped);
    }
}
