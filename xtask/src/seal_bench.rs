//! The replication link's sealing cost (issue 17, point 3), measured in one run: the same
//! two-host cluster (QEMU TCG, AMD-V, `guest-redis`, 32 MiB guest) booted with `repl_auth=on`
//! and with `repl_auth=off`, one after the other. For each:
//! - checkpoint transfer throughput: the full sync (32 MiB of RAM + 1 MiB of disk) from the
//!   primary's `full sync 1` line to its `COLO running` line, timed by polling the serial log;
//! - p50 (and p90) latency of `TIME` over one connection from the client namespace: each reply
//!   differs between PVM and SVM, so each request forces one mismatch checkpoint;
//! - the PVM pause of those checkpoints (from the commit lines): sealing happens after the PVM
//!   resumes, so the pause must not change.
//!
//! Needs root (namespaces, taps). Written to `seal.md` in the bench directory.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use qemu_tests::cluster::{Cluster, ClusterSpec, Host, Net, COLO_RUNNING};

const TIME_REQUESTS: usize = 40;
const WAIT: Duration = Duration::from_secs(240);

/// One configuration's figures.
#[derive(Debug)]
struct Figures {
    sync_bytes: u64,
    sync_s: f64,
    time_ms: Vec<f64>,
    pause_us: Vec<u64>,
}

fn percentile<T: Copy + PartialOrd>(values: &[T], p: f64) -> Option<T> {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    (!v.is_empty()).then(|| v[((v.len() - 1) as f64 * p).round() as usize])
}

/// `TIME` N times over one connection; each round trip in milliseconds.
const TIME_CLIENT: &str = r#"
import socket, sys, time
s = socket.create_connection((sys.argv[1], 6379), timeout=30)
f = s.makefile("rb")
for _ in range(int(sys.argv[2])):
    t = time.perf_counter()
    s.sendall(b"*1\r\n$4\r\nTIME\r\n")
    head = f.readline()
    assert head.startswith(b"*2"), head
    for _ in range(2):
        f.readline(); f.readline()
    print("%.3f" % ((time.perf_counter() - t) * 1000))
    time.sleep(0.2)
"#;

fn measure(dir: &Path, auth: bool, subnet: u8) -> Result<Figures, String> {
    let tag = if auth { "bson" } else { "bsof" };
    let mut spec = ClusterSpec::new(dir.join(tag), tag, subnet);
    spec.cmdline_extra = format!("repl_auth={} log=info", if auth { "on" } else { "off" });
    let mut c = Cluster::prepare(spec).map_err(|e| e.to_string())?;
    c.boot(Host::Secondary).map_err(|e| e.to_string())?;
    c.boot(Host::Primary).map_err(|e| e.to_string())?;
    // The full sync, timed on the primary's console.
    let start = Instant::now();
    let mut sync_start = None;
    let sync_end = loop {
        let serial = c.serial(Host::Primary);
        if sync_start.is_none() && serial.contains("node: full sync 1:") {
            sync_start = Some(Instant::now());
        }
        if sync_start.is_some() && serial.contains(COLO_RUNNING) {
            break Instant::now();
        }
        if start.elapsed() > WAIT || !c.alive(Host::Primary) {
            return Err(format!("repl_auth={auth}: no COLO within {WAIT:?}:\n{serial}"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let serial = c.serial(Host::Primary);
    let line = serial.lines().find(|l| l.contains("node: full sync 1:")).unwrap_or_default();
    let kib = |after: &str| -> u64 {
        line.split(after).nth(1).and_then(|r| r.split_whitespace().next()).and_then(|n| n.parse().ok()).unwrap_or(0)
    };
    let sync_bytes = (kib("full sync 1: ") + kib("KiB of RAM and ")) << 10;
    c.wait_ready(WAIT).map_err(|e| e.to_string())?;
    let commits_before = serial.matches(" committed;").count();
    let ip = c.service_ip();
    let out = c.run(Net::Client, "python3", &["-c", TIME_CLIENT, &ip, &TIME_REQUESTS.to_string()], 600);
    if !out.status.success() {
        return Err(format!("TIME client: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let time_ms: Vec<f64> =
        String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect();
    std::thread::sleep(Duration::from_secs(2));
    let serial = c.serial(Host::Primary);
    // Mismatch checkpoints during the TIME phase: their pause.
    let pause_us = serial
        .lines()
        .filter(|l| l.contains(" committed;"))
        .skip(commits_before)
        .filter_map(|l| l.split("; pause ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    c.stop();
    Ok(Figures { sync_bytes, sync_s: (sync_end - sync_start.expect("set")).as_secs_f64(), time_ms, pause_us })
}

/// Runs both configurations and writes `seal.md` to `dir`.
pub fn run(dir: &Path) -> Result<(), String> {
    let on = measure(dir, true, 90)?;
    let off = measure(dir, false, 91)?;
    let mut md = String::from(
        "## Replication link sealing cost (QEMU TCG, AMD-V, two hosts, 32 MiB guest-redis)\n\n\
         Same cluster booted with `repl_auth=on` (handshake + ChaCha20-Poly1305 records) and `repl_auth=off`, one \
         after the other in this run. Full sync: RAM + disk from the primary's `full sync 1` line to its `COLO \
         running` line (wall clock, serial log polled every 10 ms). `TIME`: one connection from the client \
         namespace, each request forcing one mismatch checkpoint (round trip, wall clock). Pause: the PVM pause of \
         those checkpoints, measured by the hypervisor (TSC); sealing happens after the PVM resumes.\n\n\
         | repl_auth | full sync | full sync throughput | TIME p50 | TIME p90 | checkpoints | pause p50 | pause p90 |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for (name, f) in [("on", &on), ("off", &off)] {
        let _ = writeln!(
            md,
            "| {name} | {:.1} MiB in {:.2} s | {:.2} MiB/s | {:.1} ms | {:.1} ms | {} | {} us | {} us |",
            f.sync_bytes as f64 / 1048576.0,
            f.sync_s,
            f.sync_bytes as f64 / 1048576.0 / f.sync_s,
            percentile(&f.time_ms, 0.5).unwrap_or(f64::NAN),
            percentile(&f.time_ms, 0.9).unwrap_or(f64::NAN),
            f.pause_us.len(),
            percentile(&f.pause_us, 0.5).unwrap_or(0),
            percentile(&f.pause_us, 0.9).unwrap_or(0),
        );
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
    let _ = writeln!(
        md,
        "\nRatios on/off: full sync throughput {:.2}, TIME p50 {:.2}, pause p50 {:.2}.\n",
        ratio(on.sync_bytes as f64 / on.sync_s, off.sync_bytes as f64 / off.sync_s),
        ratio(percentile(&on.time_ms, 0.5).unwrap_or(0.0), percentile(&off.time_ms, 0.5).unwrap_or(0.0)),
        ratio(percentile(&on.pause_us, 0.5).unwrap_or(0) as f64, percentile(&off.pause_us, 0.5).unwrap_or(0) as f64),
    );
    std::fs::write(dir.join("seal.md"), &md).map_err(|e| format!("writing seal.md: {e}"))?;
    println!("{md}");
    Ok(())
}
