//! Comparator throughput vs a plain memcpy of the same bytes, measured in one run.
//!
//! Several TCP connections carry the same byte streams from PVM and SVM; the PVM sends
//! 1448-byte segments, the SVM a different segmentation (1000-byte segments), so every
//! comparison straddles segment boundaries. Released frames are drained as a NIC would.
//! The figures go to `$COLO_BENCH_DIR/comparator.md` (default `target/bench`) and stdout.

use std::hint::black_box;
use std::time::Instant;

use hypervisor::colo::comparator::{ComparatorLimits, OutputComparator, Verdict};
use hypervisor::colo::frames;
use hypervisor::colo::Tick;
use smoltcp::wire::{Ipv4Address, TcpControl};

const CONNS: u16 = 8;
const STREAM: usize = 1 << 20; // per connection per round
const PVM_SEG: usize = 1448;
const SVM_SEG: usize = 1000;
const ROUNDS: usize = 6;

fn tcp(port: u16, seq: u32, payload: &[u8]) -> Vec<u8> {
    let (src, dst) = (Ipv4Address::new(10, 0, 0, 1), Ipv4Address::new(10, 0, 0, 2));
    frames::tcp_v4(src, dst, &frames::tcp_repr((port, 40000), seq, Some(1), TcpControl::None, 65535, payload))
}

fn segments(port: u16, isn: u32, base: usize, stream: &[u8], size: usize) -> Vec<Vec<u8>> {
    stream.chunks(size).enumerate().map(|(i, c)| tcp(port, isn.wrapping_add((base + i * size) as u32), c)).collect()
}

fn main() {
    let stream: Vec<u8> = (0..STREAM).map(|i| (i * 31 + i / 977) as u8).collect();
    // Pre-build all frames (frame construction is not what we measure).
    let mut rounds = Vec::new();
    for r in 0..ROUNDS {
        let mut pvm = Vec::new();
        let mut svm = Vec::new();
        for c in 0..CONNS {
            let base = r * STREAM;
            pvm.push(segments(80 + c, 1000, base, &stream, PVM_SEG));
            svm.push(segments(80 + c, 900_000, base, &stream, SVM_SEG));
        }
        rounds.push((pvm, svm));
    }
    let payload_bytes = (ROUNDS * STREAM * CONNS as usize) as u64;

    let mut cmp = OutputComparator::new(ComparatorLimits {
        max_held_frames: 1 << 16,
        max_held_bytes: 256 << 20,
        ..ComparatorLimits::default()
    });
    let mut released_bytes = 0u64;
    let mut checkpoints = 0u64;
    let t0 = Instant::now();
    for (pvm, svm) in &rounds {
        // Interleave: per connection, the PVM sends, then the SVM catches up, conn by conn
        // in small batches so the held queue stays short as in a live system.
        for c in 0..CONNS as usize {
            let (p, s) = (&pvm[c], &svm[c]);
            let (mut i, mut j) = (0, 0);
            while i < p.len() || j < s.len() {
                for _ in 0..4 {
                    if i < p.len() {
                        if let Verdict::CheckpointRequired(_) = cmp.push_pvm(&p[i], Tick(0)) {
                            checkpoints += 1;
                        }
                        i += 1;
                    }
                }
                for _ in 0..6 {
                    if j < s.len() {
                        if let Verdict::CheckpointRequired(_) = cmp.push_svm(&s[j], Tick(0)) {
                            checkpoints += 1;
                        }
                        j += 1;
                    }
                }
                cmp.drain_released(|f| released_bytes += black_box(f).len() as u64);
            }
        }
    }
    let cmp_secs = t0.elapsed().as_secs_f64();
    assert_eq!(checkpoints, 0, "matching streams must not need a checkpoint");
    assert_eq!(cmp.stats().compared_bytes, payload_bytes);
    assert_eq!(cmp.stats().held_frames, 0);

    // memcpy of the same number of payload bytes, in PVM-segment-sized copies.
    let mut dst = vec![0u8; STREAM];
    let t1 = Instant::now();
    for _ in 0..ROUNDS * CONNS as usize {
        for (d, s) in dst.chunks_mut(PVM_SEG).zip(black_box(&stream).chunks(PVM_SEG)) {
            d.copy_from_slice(s);
        }
        black_box(&mut dst);
    }
    let memcpy_secs = t1.elapsed().as_secs_f64();

    let cmp_rate = payload_bytes as f64 / cmp_secs;
    let memcpy_rate = payload_bytes as f64 / memcpy_secs;
    let report = format!(
        "## Comparator throughput\n\n\
         {conns} TCP connections, {mib} MiB of payload in total; PVM segments {ps} B, SVM \
         segments {ss} B (different segmentation), released frames drained.\n\n\
         | measurement | time (s) | throughput (MiB/s) |\n\
         |---|---|---|\n\
         | comparator (PVM + SVM push, release) | {ct:.4} | {cr:.1} |\n\
         | memcpy of the same payload bytes | {mt:.4} | {mr:.1} |\n\n\
         Ratio comparator/memcpy throughput: {ratio:.4} (memcpy is {slow:.1}x faster).\n\
         Frames released: {frames}, bytes released: {rb}.\n",
        conns = CONNS,
        mib = payload_bytes >> 20,
        ps = PVM_SEG,
        ss = SVM_SEG,
        ct = cmp_secs,
        cr = cmp_rate / (1 << 20) as f64,
        mt = memcpy_secs,
        mr = memcpy_rate / (1 << 20) as f64,
        ratio = cmp_rate / memcpy_rate,
        slow = memcpy_rate / cmp_rate,
        frames = cmp.stats().released_frames,
        rb = released_bytes,
    );
    print!("{report}");
    let dir = std::env::var("COLO_BENCH_DIR").unwrap_or_else(|_| "target/bench".into());
    std::fs::create_dir_all(&dir).expect("create bench dir");
    let path = std::path::Path::new(&dir).join("comparator.md");
    std::fs::write(&path, report).expect("write bench report");
    println!("written to {}", path.display());
}
