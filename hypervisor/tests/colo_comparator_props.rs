//! Property tests: the output comparator held against a simple reference model.
//!
//! The model of one TCP connection is a byte stream; the PVM and the SVM emit it cut into
//! arbitrary segments, with arbitrary ISNs, retransmissions and (for the SVM) reordering. The
//! comparator must then release every PVM frame exactly once, in order, and ask for no
//! checkpoint; a single differing byte must be reported at exactly its offset; and across any
//! number of checkpoints no frame is lost or duplicated.

use hypervisor::colo::comparator::{CheckpointRequest, ComparatorLimits, OutputComparator, Verdict};
use hypervisor::colo::frames;
use hypervisor::colo::packet::parse_frame;
use hypervisor::colo::Tick;
use proptest::prelude::*;
use smoltcp::wire::{Ipv4Address, TcpControl};

const SRV: Ipv4Address = Ipv4Address::new(10, 0, 0, 1);
const CLI: Ipv4Address = Ipv4Address::new(10, 0, 0, 2);

/// A server-to-client TCP frame.
fn tcp(port: u16, seq: u32, ctl: TcpControl, payload: &[u8]) -> Vec<u8> {
    frames::tcp_v4(SRV, CLI, &frames::tcp_repr((port, 40000), seq, Some(1), ctl, 1000, payload))
}

fn udp(port: u16, payload: &[u8]) -> Vec<u8> {
    frames::udp_v4(SRV, CLI, (port, 9), payload)
}

/// Cut `len` bytes at the given (unsorted, possibly duplicate) points into ranges.
fn cut(len: usize, points: &[usize]) -> Vec<(usize, usize)> {
    let mut p: Vec<usize> = points.iter().map(|&x| x % (len + 1)).collect();
    p.push(0);
    p.push(len);
    p.sort_unstable();
    p.dedup();
    p.windows(2).map(|w| (w[0], w[1])).collect()
}

/// A side's frames: SYN-ACK, then data segments (offset 0 = ISN + 1), with retransmissions:
/// each `(after, which)` re-sends segment `which` right after segment `after`.
fn side_frames(
    port: u16,
    isn: u32,
    stream: &[u8],
    cuts: &[(usize, usize)],
    retrans: &[(usize, usize)],
) -> Vec<(Vec<u8>, usize)> {
    let mut out = vec![(tcp(port, isn, TcpControl::Syn, b""), 0)];
    let seg = |&(a, b): &(usize, usize)| {
        (tcp(port, isn.wrapping_add(1).wrapping_add(a as u32), TcpControl::Psh, &stream[a..b]), b)
    };
    for (i, c) in cuts.iter().enumerate() {
        out.push(seg(c));
        for &(after, which) in retrans {
            if after % cuts.len() == i {
                let w = which % (i + 1);
                out.push(seg(&cuts[w]));
            }
        }
    }
    out
}

/// Capture and commit at once (no pipelining).
fn commit(c: &mut OutputComparator) {
    let m = c.mark_capture();
    c.on_checkpoint_committed(m).unwrap();
}

fn drain(c: &mut OutputComparator) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    c.drain_released(|f| v.push(f.to_vec()));
    v
}

fn limits() -> ComparatorLimits {
    ComparatorLimits {
        held_frame_timeout: 1_000_000,
        max_held_frames: 100_000,
        max_held_bytes: 100 << 20,
        ..ComparatorLimits::default()
    }
}

fn shuffle<T>(v: &mut [T], seed: u64) {
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The same byte streams (two connections), cut differently, with retransmissions on both
    /// sides, the SVM's data segments reordered, and PVM/SVM pushes interleaved arbitrarily:
    /// everything is released, in order, exactly once, and no checkpoint is requested.
    #[test]
    fn same_streams_any_segmentation_release_everything(
        stream_a in proptest::collection::vec(any::<u8>(), 1..1500),
        stream_b in proptest::collection::vec(any::<u8>(), 1..600),
        pcuts in proptest::collection::vec(any::<usize>(), 0..12),
        scuts in proptest::collection::vec(any::<usize>(), 0..12),
        pret in proptest::collection::vec((any::<usize>(), any::<usize>()), 0..4),
        sret in proptest::collection::vec((any::<usize>(), any::<usize>()), 0..4),
        pisn in any::<u32>(),
        sisn in any::<u32>(),
        seed in any::<u64>(),
        interleave in proptest::collection::vec(any::<bool>(), 0..64),
    ) {
        let mut c = OutputComparator::new(limits());
        let mut pvm = Vec::new();
        let mut svm = Vec::new();
        for (port, stream) in [(80u16, &stream_a), (81u16, &stream_b)] {
            let p = side_frames(port, pisn, stream, &cut(stream.len(), &pcuts), &pret);
            let mut s = side_frames(port, sisn, stream, &cut(stream.len(), &scuts), &sret);
            shuffle(&mut s[1..], seed ^ u64::from(port));
            pvm.push(p);
            svm.push(s);
        }
        // Interleave the two connections' frames per side (per-connection order kept).
        let merge = |a: &Vec<(Vec<u8>, usize)>, b: &Vec<(Vec<u8>, usize)>, pick: &[bool]| {
            let (mut i, mut j, mut k) = (0, 0, 0);
            let mut out = Vec::new();
            while i < a.len() || j < b.len() {
                let take_a = j >= b.len() || (i < a.len() && pick.get(k).copied().unwrap_or(true));
                k += 1;
                if take_a { out.push(a[i].0.clone()); i += 1 } else { out.push(b[j].0.clone()); j += 1 }
            }
            out
        };
        let pvm_all = merge(&pvm[0], &pvm[1], &interleave);
        let svm_all = merge(&svm[0], &svm[1], &interleave[interleave.len() / 2..]);
        let (mut i, mut j) = (0, 0);
        let mut k = 0;
        while i < pvm_all.len() || j < svm_all.len() {
            let take_p = j >= svm_all.len()
                || (i < pvm_all.len() && interleave.get(k % interleave.len().max(1)).copied().unwrap_or(true) ^ (k % 3 == 0));
            k += 1;
            let v = if take_p { i += 1; c.push_pvm(&pvm_all[i - 1], Tick(0)) } else { j += 1; c.push_svm(&svm_all[j - 1], Tick(0)) };
            prop_assert!(!matches!(v, Verdict::CheckpointRequired(_)), "unexpected {:?}", v);
        }
        prop_assert_eq!(c.poll(Tick(1)), None);
        let out = drain(&mut c);
        // Per flow, released frames are the PVM's frames in the PVM's order, all of them.
        for port in [80u16, 81] {
            let want: Vec<&Vec<u8>> = pvm_all.iter().filter(|f| parse_frame(f).flow.src_port == port).collect();
            let got: Vec<&Vec<u8>> = out.iter().filter(|f| parse_frame(f).flow.src_port == port).collect();
            prop_assert_eq!(got, want);
        }
        prop_assert_eq!(c.stats().compared_bytes, (stream_a.len() + stream_b.len()) as u64);
        prop_assert_eq!(c.stats().held_frames, 0);
    }

    /// One differing byte at offset `k`: a PayloadMismatch at exactly `k`, no PVM frame carrying
    /// byte `k` or later is released before the checkpoint, and the commit releases the rest.
    #[test]
    fn single_differing_byte_reports_exact_offset(
        stream in proptest::collection::vec(any::<u8>(), 1..1200),
        k in any::<usize>(),
        flip in 1u8..=255,
        pcuts in proptest::collection::vec(any::<usize>(), 0..10),
        scuts in proptest::collection::vec(any::<usize>(), 0..10),
        pisn in any::<u32>(),
        sisn in any::<u32>(),
        seed in any::<u64>(),
        svm_first in any::<bool>(),
    ) {
        let k = k % stream.len();
        let mut other = stream.clone();
        other[k] ^= flip;
        let p = side_frames(80, pisn, &stream, &cut(stream.len(), &pcuts), &[]);
        let mut s = side_frames(80, sisn, &other, &cut(other.len(), &scuts), &[]);
        shuffle(&mut s[1..], seed);
        let mut c = OutputComparator::new(limits());
        let key = parse_frame(&p[0].0).flow;
        let want = CheckpointRequest::PayloadMismatch { conn: key, offset: k as u64 };
        let mut seen = None;
        let mut push_all = |c: &mut OutputComparator, pvm: bool| {
            for (f, _) in if pvm { &p } else { &s } {
                let v = if pvm { c.push_pvm(f, Tick(0)) } else { c.push_svm(f, Tick(0)) };
                if let Verdict::CheckpointRequired(r) = v {
                    seen.get_or_insert(r);
                }
            }
        };
        push_all(&mut c, !svm_first);
        push_all(&mut c, svm_first);
        prop_assert_eq!(seen, Some(want));
        prop_assert_eq!(c.poll(Tick(0)), Some(want));
        let before = drain(&mut c);
        for f in &before {
            let end = p.iter().find(|(g, _)| g == f).map(|(_, e)| *e).unwrap();
            prop_assert!(end <= k, "released a frame ending at {} past mismatch {}", end, k);
        }
        commit(&mut c);
        let mut all = before;
        all.extend(drain(&mut c));
        let want_frames: Vec<Vec<u8>> = p.iter().map(|(f, _)| f.clone()).collect();
        prop_assert_eq!(all, want_frames);
        prop_assert_eq!(c.poll(Tick(1)), None);
    }

    /// Random operations (PVM/SVM TCP segments, datagrams, divergences, checkpoints): no PVM
    /// frame is ever lost or duplicated, and after a checkpoint the connection keeps matching.
    #[test]
    fn no_frame_lost_or_duplicated_across_checkpoints(
        ops in proptest::collection::vec((0u8..8, 1usize..200), 1..80),
        isn in any::<u32>(),
        svm_isn in any::<u32>(),
    ) {
        let stream: Vec<u8> = (0..20_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let mut c = OutputComparator::new(limits());
        let (mut ppos, mut spos) = (0usize, 0usize);
        let mut s_isn = svm_isn;
        let mut diverged = false;
        let mut pushed: Vec<Vec<u8>> = Vec::new();
        let mut out: Vec<Vec<u8>> = Vec::new();
        let mut dgram = 0u32;
        // Both sides open the connection.
        let syn = tcp(80, isn, TcpControl::Syn, b"");
        c.push_pvm(&syn, Tick(0));
        pushed.push(syn);
        c.push_svm(&tcp(80, s_isn, TcpControl::Syn, b""), Tick(0));
        for (op, n) in ops {
            match op {
                0..=2 => {
                    let e = (ppos + n).min(stream.len());
                    let f = tcp(80, isn.wrapping_add(1 + ppos as u32), TcpControl::None, &stream[ppos..e]);
                    c.push_pvm(&f, Tick(0));
                    pushed.push(f);
                    ppos = e;
                }
                3..=4 => {
                    let e = (spos + n).min(stream.len());
                    let mut bytes = stream[spos..e].to_vec();
                    if n % 17 == 0 && !bytes.is_empty() {
                        bytes[0] ^= 0x80;
                        diverged = true;
                    }
                    c.push_svm(&tcp(80, s_isn.wrapping_add(1 + spos as u32), TcpControl::None, &bytes), Tick(0));
                    spos = e;
                }
                5 => {
                    dgram += 1;
                    let f = udp(53, &dgram.to_be_bytes());
                    c.push_pvm(&f, Tick(0));
                    pushed.push(f);
                    if n % 3 != 0 {
                        c.push_svm(&udp(53, &dgram.to_be_bytes()), Tick(0));
                    }
                }
                6 => {
                    // PVM retransmits its last bytes.
                    let s = ppos.saturating_sub(n);
                    if s < ppos {
                        let f = tcp(80, isn.wrapping_add(1 + s as u32), TcpControl::None, &stream[s..ppos]);
                        c.push_pvm(&f, Tick(0));
                        pushed.push(f);
                    }
                }
                _ => {
                    commit(&mut c);
                    // The SVM now runs the PVM's state.
                    spos = ppos;
                    s_isn = isn;
                    diverged = false;
                }
            }
            out.extend(drain(&mut c));
            // Only a divergence may ask for a checkpoint (or an SVM byte the PVM has not sent
            // yet; that is simply buffered).
            if let Some(r) = c.pending_request() {
                prop_assert!(diverged, "unexpected request {:?}", r);
            }
        }
        commit(&mut c);
        out.extend(drain(&mut c));
        prop_assert_eq!(out.len(), pushed.len());
        let mut a = out.clone();
        let mut b = pushed.clone();
        a.sort();
        b.sort();
        prop_assert_eq!(a, b);
        prop_assert_eq!(c.stats().held_frames, 0);
    }

    /// Random bytes (and mutated valid frames) as frames never panic, and every PVM frame is
    /// still released exactly once by a final checkpoint.
    #[test]
    fn random_frames_never_panic(
        frames in proptest::collection::vec(
            (any::<bool>(), proptest::collection::vec(any::<u8>(), 0..120), any::<u16>(), any::<u8>()),
            1..60),
    ) {
        let mut c = OutputComparator::new(ComparatorLimits {
            max_held_frames: 8,
            max_connections: 4,
            max_held_bytes: 2000,
            held_frame_timeout: 3,
            ..ComparatorLimits::default()
        });
        let mut pushed = 0usize;
        let mut out = 0usize;
        for (t, (pvm, bytes, pos, x)) in frames.into_iter().enumerate() {
            let f = if bytes.len() % 3 == 0 {
                // A valid frame with one byte changed.
                let mut f = tcp(80 + (x % 3) as u16, u32::from(pos), TcpControl::None, &bytes);
                let i = pos as usize % f.len();
                f[i] ^= x;
                f
            } else {
                let mut f = bytes.clone();
                if f.len() > 13 { f[12] = 0x08; f[13] = if x % 2 == 0 { 0 } else { 6 }; }
                f
            };
            if pvm { c.push_pvm(&f, Tick(t as u64)); pushed += 1; } else { c.push_svm(&f, Tick(t as u64)); }
            if c.poll(Tick(t as u64)).is_some() && x % 4 == 0 {
                commit(&mut c);
            }
            c.drain_released(|_| out += 1);
        }
        commit(&mut c);
        c.drain_released(|_| out += 1);
        prop_assert_eq!(out, pushed);
    }
}
