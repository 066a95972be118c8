//! The verifying writer: a real RESP client that proves no acknowledged write is lost.
//!
//! It opens `--connections` persistent TCP connections to the service and keeps each one busy
//! with `SET <prefix>:<conn>:<n> <value>` until `--seconds` pass (or `--stop-file` appears),
//! recording every write the server acknowledged with `+OK` and how long each took. It never
//! reconnects: a reset, an EOF or an error reply is counted and ends that connection, because a
//! COLO failover must keep the very same TCP connections alive. At the end each surviving
//! connection reads back, with `GET` on the same connection, every key it was told was stored.
//!
//! Output (stdout): one `key=value` summary line per figure, then `verdict=ok|fail`. With
//! `--samples FILE`, one line per request: `ms_since_start latency_us connection`.
//! Exit status 0 only if no request failed and no acknowledged write is missing.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Options {
    addr: SocketAddr,
    connections: usize,
    seconds: f64,
    prefix: String,
    samples: Option<PathBuf>,
    stop_file: Option<PathBuf>,
    reply_timeout: Duration,
}

fn usage() -> ! {
    eprintln!(
        "usage: colo-writer --addr IP:PORT [--connections N (1..=256, default 4)] [--seconds S (default 10)] \
         [--prefix P] [--samples FILE] [--stop-file FILE] [--reply-timeout-ms MS (default 10000)]"
    );
    std::process::exit(2)
}

fn parse_options() -> Options {
    let mut args = std::env::args().skip(1);
    let mut o = Options {
        addr: "127.0.0.1:6379".parse().expect("literal"),
        connections: 4,
        seconds: 10.0,
        prefix: format!("w{}", std::process::id()),
        samples: None,
        stop_file: None,
        reply_timeout: Duration::from_secs(10),
    };
    let mut have_addr = false;
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| {
            eprintln!("colo-writer: `{flag}` needs a value");
            usage()
        });
        let bad = |what: &str| -> ! {
            eprintln!("colo-writer: bad value `{value}` for {flag}; expected {what}");
            usage()
        };
        match flag.as_str() {
            "--addr" => {
                o.addr = value.parse().unwrap_or_else(|_| bad("IP:PORT"));
                have_addr = true;
            }
            "--connections" => {
                o.connections = value.parse().ok().filter(|n| (1..=256).contains(n)).unwrap_or_else(|| bad("1..=256"))
            }
            "--seconds" => {
                o.seconds =
                    value.parse().ok().filter(|s: &f64| *s > 0.0 && *s < 86_400.0).unwrap_or_else(|| bad("seconds"))
            }
            "--prefix" => {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
                    bad("letters, digits, - and _")
                }
                o.prefix = value
            }
            "--samples" => o.samples = Some(value.into()),
            "--stop-file" => o.stop_file = Some(value.into()),
            "--reply-timeout-ms" => {
                o.reply_timeout =
                    Duration::from_millis(value.parse().ok().filter(|&n| n > 0).unwrap_or_else(|| bad("milliseconds")))
            }
            _ => {
                eprintln!("colo-writer: unknown option `{flag}`");
                usage()
            }
        }
    }
    if !have_addr {
        usage()
    }
    o
}

/// What one connection saw.
#[derive(Default)]
struct ConnReport {
    requests: u64,
    acked: Vec<(String, String)>,
    error: Option<String>,
    samples: Vec<(u64, u64)>,
    lost: Vec<String>,
    verified: u64,
}

/// Reads one RESP reply line (simple string, error, or bulk header) and a bulk body if any.
fn read_reply(reader: &mut BufReader<TcpStream>) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    let n = reader.read_until(b'\n', &mut line).map_err(|e| format!("read: {e}"))?;
    if n == 0 {
        return Err("connection closed by the server".into());
    }
    if !line.ends_with(b"\r\n") {
        return Err(format!("reply not terminated by CRLF: {:?}", String::from_utf8_lossy(&line)));
    }
    let text = String::from_utf8_lossy(&line[..line.len() - 2]).into_owned();
    match line[0] {
        b'+' => Ok(Some(line[1..line.len() - 2].to_vec())),
        b'-' => Err(format!("error reply: {text}")),
        b'$' => {
            let len: i64 = text[1..].parse().map_err(|_| format!("bad bulk length `{text}`"))?;
            if len < 0 {
                return Ok(None);
            }
            let mut body = vec![0u8; len as usize + 2];
            std::io::Read::read_exact(reader, &mut body).map_err(|e| format!("read bulk: {e}"))?;
            body.truncate(len as usize);
            Ok(Some(body))
        }
        _ => Err(format!("unexpected reply `{text}`")),
    }
}

fn command(parts: &[&str]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", parts.len()).into_bytes();
    for p in parts {
        out.extend_from_slice(format!("${}\r\n{p}\r\n", p.len()).as_bytes());
    }
    out
}

fn run_connection(o: &Options, conn: usize, start: Instant, stop: &dyn Fn() -> bool) -> ConnReport {
    let mut report = ConnReport::default();
    let stream = match TcpStream::connect_timeout(&o.addr, Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => {
            report.error = Some(format!("connect to {}: {e}", o.addr));
            return report;
        }
    };
    let _ = stream.set_nodelay(true);
    let _ = stream.set_read_timeout(Some(o.reply_timeout));
    let mut writer = stream.try_clone().expect("clone socket");
    let mut reader = BufReader::new(stream);
    let mut n = 0u64;
    while !stop() {
        let key = format!("{}:{conn}:{n}", o.prefix);
        let value = format!("v{n}-{}", n.wrapping_mul(0x9E37_79B9_7F4A_7C15) % 1_000_003);
        let sent = Instant::now();
        report.requests += 1;
        let result = writer
            .write_all(&command(&["SET", &key, &value]))
            .map_err(|e| format!("write: {e}"))
            .and_then(|()| read_reply(&mut reader));
        match result {
            Ok(Some(reply)) if reply == b"OK" => {
                let latency = sent.elapsed();
                report.samples.push((sent.duration_since(start).as_millis() as u64, latency.as_micros() as u64));
                report.acked.push((key, value));
            }
            Ok(other) => {
                report.error = Some(format!("SET {key}: unexpected reply {other:?}"));
                return report;
            }
            Err(e) => {
                report.error = Some(format!("SET {key}: {e}"));
                return report;
            }
        }
        n += 1;
    }
    // Read back every acknowledged write on the same connection.
    for (key, value) in &report.acked {
        let result = writer
            .write_all(&command(&["GET", key]))
            .map_err(|e| format!("write: {e}"))
            .and_then(|()| read_reply(&mut reader));
        match result {
            Ok(Some(v)) if v == value.as_bytes() => report.verified += 1,
            Ok(_) => report.lost.push(key.clone()),
            Err(e) => {
                report.error = Some(format!("GET {key}: {e}"));
                break;
            }
        }
    }
    report
}

fn main() {
    let o = Arc::new(parse_options());
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(o.seconds);
    let reports = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..o.connections)
        .map(|conn| {
            let (o, reports) = (o.clone(), reports.clone());
            std::thread::spawn(move || {
                let stop = || Instant::now() >= deadline || o.stop_file.as_ref().is_some_and(|f| f.exists());
                let report = run_connection(&o, conn, start, &stop);
                reports.lock().expect("reports").push((conn, report));
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer thread");
    }
    let mut reports = std::mem::take(&mut *reports.lock().expect("reports"));
    reports.sort_by_key(|(c, _)| *c);
    let requests: u64 = reports.iter().map(|(_, r)| r.requests).sum();
    let acked: usize = reports.iter().map(|(_, r)| r.acked.len()).sum();
    let verified: u64 = reports.iter().map(|(_, r)| r.verified).sum();
    let lost: usize = reports.iter().map(|(_, r)| r.lost.len()).sum();
    let errors: Vec<String> =
        reports.iter().filter_map(|(c, r)| r.error.as_ref().map(|e| format!("conn {c}: {e}"))).collect();
    let mut latencies: Vec<u64> = reports.iter().flat_map(|(_, r)| r.samples.iter().map(|s| s.1)).collect();
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    if let Some(path) = &o.samples {
        let mut text = String::new();
        for (conn, r) in &reports {
            for (at, lat) in &r.samples {
                text += &format!("{at} {lat} {conn}\n");
            }
        }
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("colo-writer: writing {}: {e}", path.display());
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!("connections={}", o.connections);
    println!("requests={requests}");
    println!("acked={acked}");
    println!("verified={verified}");
    println!("lost={lost}");
    println!("errors={}", errors.len());
    println!("seconds={elapsed:.3}");
    println!("rate={:.1}", acked as f64 / elapsed.max(1e-9));
    println!("p50_us={}", pct(0.50));
    println!("p99_us={}", pct(0.99));
    println!("max_us={}", latencies.last().copied().unwrap_or(0));
    for e in &errors {
        println!("error={e}");
    }
    for (c, r) in &reports {
        for key in r.lost.iter().take(10) {
            println!("lost_key=conn {c}: {key}");
        }
    }
    let ok = errors.is_empty() && lost == 0 && verified as usize == acked && acked > 0;
    println!("verdict={}", if ok { "ok" } else { "fail" });
    std::process::exit(if ok { 0 } else { 1 });
}
