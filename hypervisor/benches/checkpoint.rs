//! Checkpoint codec throughput against a plain memcpy of the same page bytes, in one run.
//!
//! Writes a Markdown section to `$COLO_BENCH_DIR/checkpoint.md` (default `target/bench`).

use hypervisor::colo::checkpoint::{
    CheckpointDecoder, CheckpointEncoder, DirtyPage, Feed, HeaderInfo, StagedCheckpoint, StreamLimits, VecGuestMemory,
};
use std::hint::black_box;
use std::time::{Duration, Instant};

const PS: usize = 4096;
const PAGES: usize = 10_000;
const FRAMES: u64 = 16_384;
const REPS: usize = 5;

fn fill(seed: u64, out: &mut [u8]) {
    let mut x = seed | 1;
    for c in out.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        c.copy_from_slice(&b[..c.len()]);
    }
}

struct Set {
    name: &'static str,
    gfns: Vec<u64>,
    data: Vec<u8>,
    prev: Option<Vec<u8>>,
    /// Receiver memory holding `prev` at each frame.
    base: VecGuestMemory,
}

fn random_set() -> Set {
    let gfns: Vec<u64> = (0..PAGES as u64).map(|i| i + i / 7).collect();
    let mut data = vec![0u8; PAGES * PS];
    fill(42, &mut data);
    Set { name: "random 4 KiB pages (raw)", gfns, data, prev: None, base: VecGuestMemory::new(PS, FRAMES as usize) }
}

/// One third zero pages, one third small edits of the receiver's page (delta), one third random.
fn mixed_set() -> Set {
    let gfns: Vec<u64> = (0..PAGES as u64).map(|i| i + i / 7).collect();
    let mut data = vec![0u8; PAGES * PS];
    let mut prev = vec![0u8; PAGES * PS];
    fill(7, &mut prev);
    fill(99, &mut data);
    let mut base = VecGuestMemory::new(PS, FRAMES as usize);
    for (i, &gfn) in gfns.iter().enumerate() {
        let r = i * PS..(i + 1) * PS;
        match i % 3 {
            0 => data[r.clone()].fill(0),
            1 => {
                let (d, p) = (&mut data[r.clone()], &prev[r.clone()]);
                d.copy_from_slice(p);
                for k in 0..16 {
                    d[(k * 251 + i) % PS] ^= 0x5A;
                }
            }
            _ => {}
        }
        use hypervisor::colo::checkpoint::GuestMemoryMut;
        base.frame_mut(gfn).copy_from_slice(&prev[r]);
    }
    Set { name: "mixed: 1/3 zero, 1/3 delta, 1/3 raw", gfns, data, prev: Some(prev), base }
}

/// Epoch of the benchmarked checkpoint.
const EPOCH: u64 = 1;

fn limits() -> StreamLimits {
    StreamLimits::for_guest(FRAMES)
}

fn encode(set: &Set, out: &mut Vec<u8>) {
    out.clear();
    let info =
        HeaderInfo { epoch: EPOCH, page_size: PS as u32, page_count: PAGES as u32, vcpu_count: 1, device_count: 1 };
    let pages: Vec<DirtyPage<'_>> = set
        .gfns
        .iter()
        .enumerate()
        .map(|(i, &gfn)| DirtyPage {
            gfn,
            data: &set.data[i * PS..(i + 1) * PS],
            previous: set.prev.as_ref().map(|p| &p[i * PS..(i + 1) * PS]),
        })
        .collect();
    let mut enc = CheckpointEncoder::new(&mut *out, info, limits()).expect("header");
    enc.pages(&pages).expect("pages");
    enc.vcpu_state(0, 1, &[0xAB; 1024]).expect("vcpu");
    enc.device_state(1, 1, &[0xCD; 256]).expect("device");
    enc.finish().expect("finish");
}

fn decode(bytes: &[u8]) -> StagedCheckpoint {
    let mut d = CheckpointDecoder::new(limits());
    for c in bytes.chunks(64 * 1024) {
        if let Feed::Complete { checkpoint, .. } = d.feed(c).expect("decode") {
            return checkpoint;
        }
    }
    panic!("checkpoint incomplete");
}

fn best<F: FnMut()>(mut f: F) -> Duration {
    (0..REPS)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed()
        })
        .min()
        .unwrap_or_default()
}

struct Row {
    what: String,
    time: Duration,
    ratio: f64,
}

fn pages_per_s(d: Duration) -> f64 {
    PAGES as f64 / d.as_secs_f64()
}

fn main() {
    let mut rows = Vec::new();
    let mut sizes = Vec::new();
    for set in [random_set(), mixed_set()] {
        // memcpy of the same page bytes.
        let mut dst = vec![0u8; set.data.len()];
        let memcpy = best(|| {
            dst.copy_from_slice(black_box(&set.data));
            black_box(&mut dst);
        });
        let mut stream = Vec::with_capacity(set.data.len() + set.data.len() / 8);
        let enc = best(|| {
            encode(black_box(&set), &mut stream);
            black_box(&stream);
        });
        let dec = best(|| {
            black_box(decode(black_box(&stream)));
        });
        let cp = decode(&stream);
        let mut mem = set.base.clone();
        // Memory is reset outside the timed region.
        let apply = (0..REPS)
            .map(|_| {
                mem.clone_from(&set.base);
                let staged = cp.clone();
                let t = Instant::now();
                black_box(staged.apply_to(black_box(&mut mem), EPOCH).expect("apply"));
                t.elapsed()
            })
            .min()
            .unwrap_or_default();
        // Check the result once.
        for (i, &gfn) in set.gfns.iter().enumerate().step_by(97) {
            assert_eq!(mem.frame(gfn), &set.data[i * PS..(i + 1) * PS], "page {gfn} wrong");
        }
        sizes.push((set.name, stream.len()));
        for (what, t) in [("memcpy", memcpy), ("encode", enc), ("decode + verify", dec), ("apply (verified)", apply)] {
            rows.push(Row {
                what: format!("{}: {what}", set.name),
                time: t,
                ratio: memcpy.as_secs_f64() / t.as_secs_f64().max(1e-9),
            });
        }
    }

    let mut md = String::new();
    md.push_str("## Checkpoint codec\n\n");
    md.push_str(&format!(
        "{PAGES} pages of {PS} bytes ({} MiB), best of {REPS}; ratio = memcpy time / operation time \
         (1.0 = as fast as copying the same bytes).\n\n",
        PAGES * PS / (1 << 20)
    ));
    md.push_str("| operation | time (ms) | pages/s | ratio to memcpy |\n|---|---:|---:|---:|\n");
    for r in &rows {
        md.push_str(&format!(
            "| {} | {:.2} | {:.0} | {:.3} |\n",
            r.what,
            r.time.as_secs_f64() * 1e3,
            pages_per_s(r.time),
            r.ratio
        ));
    }
    md.push('\n');
    for (name, len) in &sizes {
        md.push_str(&format!(
            "Stream size, {name}: {len} bytes ({:.1}% of raw page bytes)\n\n",
            100.0 * *len as f64 / (PAGES * PS) as f64
        ));
    }
    print!("{md}");
    let dir = std::env::var("COLO_BENCH_DIR").unwrap_or_else(|_| "target/bench".to_string());
    let path = std::path::Path::new(&dir).join("checkpoint.md");
    if let Err(e) = std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, &md)) {
        eprintln!("could not write {}: {e}", path.display());
        std::process::exit(1);
    }
    println!("written to {}", path.display());
}
