//! The TCP determinism shim: what makes two replicas' TCP output byte-identical given the same
//! input, so the COLO comparator rarely sees a difference. Each part can be switched off from the
//! guest's command line to measure its effect:
//!
//! | switch | on (default) | off |
//! |---|---|---|
//! | `shim_ts=` | TCP timestamps from the coarse clock, [`TS_TICKS`] ticks per unit (smoltcp's `set_tsval_generator`) | timestamps in clock ticks (1 ms) |
//! | `shim_ack=` | ACK policy: every segment with data is acknowledged at once (`set_ack_delay(None)`), so ACKs depend only on received data | smoltcp's 10 ms delayed-ACK timer |
//! | `shim_win=` | advertised windows rounded down to [`WINDOW_QUANTUM`] bytes (rewritten in the NIC's transmit path, checksum recomputed: smoltcp has no option for it) | the exact free buffer space |
//! | `shim_isn=` | initial sequence numbers from a fixed seed derived from the MAC (smoltcp draws ISNs from its interface PRNG; the seed is `Config::random_seed`) | ISNs that depend on time, as in a stock TCP stack (RFC 6528's timer term): a seed from the clock at start, and [`IsnStir`] draws from the PRNG a clock-dependent number of times at every loop turn (two replicas running from one state, as COLO's PVM and SVM do after a sync, would otherwise draw the same ISNs) |
//!
//! smoltcp is polled with the coarse guest clock (1 ms ticks from the hypervisor), never a
//! finer source.

use smoltcp::iface::Interface;
use smoltcp::socket::tcp;
use smoltcp::time::{Duration, Instant};
use smoltcp::wire::{EthernetFrame, EthernetProtocol, IpAddress, IpProtocol, Ipv4Packet, TcpPacket};

use crate::rt::{clock_now, Env};

/// Clock ticks per TCP timestamp unit when `shim_ts` is on (100 ms at 1000 ticks/s).
pub const TS_TICKS: u64 = 100;
/// Advertised windows are multiples of this many bytes when `shim_win` is on.
pub const WINDOW_QUANTUM: u16 = 1024;

/// Which parts of the shim are on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShimConfig {
    /// Coarse TCP timestamps.
    pub ts: bool,
    /// Deterministic ACK policy.
    pub ack: bool,
    /// Coarse window advertisement.
    pub win: bool,
    /// Deterministic initial sequence numbers.
    pub isn: bool,
}

impl ShimConfig {
    /// From `shim_ts= shim_ack= shim_win= shim_isn=` (`on`/`off`, default on).
    pub fn from_env(env: &Env) -> Self {
        let on = |key| env.arg(key) != Some("off");
        Self { ts: on("shim_ts"), ack: on("shim_ack"), win: on("shim_win"), isn: on("shim_isn") }
    }

    /// Applies the per-socket parts to a TCP socket.
    pub fn configure(&self, socket: &mut tcp::Socket<'_>) {
        socket.set_tsval_generator(Some(if self.ts { coarse_tsval } else { fine_tsval }));
        socket.set_ack_delay(if self.ack { None } else { Some(Duration::from_millis(10)) });
        socket.set_nagle_enabled(false);
    }

    /// The interface PRNG seed (ISNs come from it).
    pub fn random_seed(&self, mac: [u8; 6]) -> u64 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in mac {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
        if self.isn {
            h
        } else {
            h ^ clock_now().wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (core::ptr::addr_of!(h) as u64)
        }
    }
}

/// `shim_isn=off`: makes the ISNs smoltcp draws from its interface PRNG depend on time. A
/// socket outside any socket set opens and aborts a connection (each open draws one value, as a
/// SYN's ISN does) `clock % 4` times per [`IsnStir::turn`]; nothing is ever sent.
pub struct IsnStir {
    socket: tcp::Socket<'static>,
}

impl IsnStir {
    /// A stirring socket (its buffers are never used).
    pub fn new() -> Self {
        let buffers = || tcp::SocketBuffer::new(alloc::vec![0u8; 1]);
        Self { socket: tcp::Socket::new(buffers(), buffers()) }
    }

    /// Stirs the PRNG; `addr` is one of the interface's own addresses.
    pub fn turn(&mut self, iface: &mut Interface, addr: IpAddress) {
        for _ in 0..clock_now() % 4 {
            let _ = self.socket.connect(iface.context(), (addr, 9), (addr, 9));
            self.socket.abort();
        }
    }
}

impl core::fmt::Debug for IsnStir {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("IsnStir")
    }
}

impl Default for IsnStir {
    fn default() -> Self {
        Self::new()
    }
}

fn coarse_tsval() -> u32 {
    (clock_now() / TS_TICKS) as u32
}

fn fine_tsval() -> u32 {
    clock_now() as u32
}

/// smoltcp's notion of now: the coarse guest clock.
pub fn now() -> Instant {
    Instant::from_millis(clock_now() as i64)
}

/// Rounds the window of an outgoing IPv4 TCP segment down to [`WINDOW_QUANTUM`] (windows below
/// it are left alone so the shim never closes a window) and fixes the checksum. True when the
/// frame changed.
pub fn round_tcp_window(frame: &mut [u8]) -> bool {
    let Ok(mut eth) = EthernetFrame::new_checked(frame) else { return false };
    if eth.ethertype() != EthernetProtocol::Ipv4 {
        return false;
    }
    let Ok(mut ip) = Ipv4Packet::new_checked(eth.payload_mut()) else { return false };
    if ip.next_header() != IpProtocol::Tcp || ip.more_frags() || ip.frag_offset() != 0 {
        return false;
    }
    let (src, dst) = (IpAddress::Ipv4(ip.src_addr()), IpAddress::Ipv4(ip.dst_addr()));
    let Ok(mut tcp) = TcpPacket::new_checked(ip.payload_mut()) else { return false };
    let window = tcp.window_len();
    let rounded = window - window % WINDOW_QUANTUM;
    if window < WINDOW_QUANTUM || rounded == window {
        return false;
    }
    tcp.set_window_len(rounded);
    tcp.fill_checksum(&src, &dst);
    true
}
