//! `cargo xtask cluster start | status | stop | exec -- CMD... | kill primary|secondary`: a
//! two-host COLO cluster on this machine (`qemu_tests::cluster`), kept in `target/cluster/`.

use std::process::Command;

use qemu_tests::cluster::{Cluster, ClusterSpec, Host};
use qemu_tests::target_dir;

pub const USAGE: &str = "\
usage: cargo xtask cluster <command>
commands:
  start [--subnet N] [--cmdline \"key=value ...\"]
                        build, boot the primary and the secondary (QEMU TCG, AMD-V), wait until the
                        replication link is up and the service listens, print `service: IP:PORT`
  status                the service line and each host's emulator and management status
  stop                  kill both hosts and remove the namespaces, taps and bridges
  exec -- CMD [ARGS]    run CMD in the client network namespace (e.g. redis-cli -h IP set k v)
  kill primary|secondary
                        kill -9 one host's emulator (a host failure)";

fn dir() -> std::path::PathBuf {
    target_dir().join("cluster")
}

pub fn cluster(args: &[String]) -> Result<(), String> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    match words.as_slice() {
        ["start", rest @ ..] => start(rest),
        ["status"] => {
            let cluster = Cluster::load(&dir()).map_err(|e| e.to_string())?;
            print!("{}", cluster.status());
            Ok(())
        }
        ["stop"] => {
            let mut cluster = Cluster::load(&dir()).map_err(|e| e.to_string())?;
            cluster.stop();
            println!("cluster stopped; serial logs kept in {}", dir().display());
            Ok(())
        }
        ["exec", "--", program, rest @ ..] | ["exec", program, rest @ ..] => {
            let cluster = Cluster::load(&dir()).map_err(|e| e.to_string())?;
            let status = Command::new("ip")
                .args(["netns", "exec", &cluster.client_netns(), program])
                .args(rest)
                .status()
                .map_err(|e| format!("cannot run `{program}` in {}: {e}", cluster.client_netns()))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("`{program}` exited with {status}"))
            }
        }
        ["kill", host] => {
            let host =
                Host::parse(host).ok_or_else(|| format!("unknown host `{host}`; accepted: primary|secondary"))?;
            let mut cluster = Cluster::load(&dir()).map_err(|e| e.to_string())?;
            cluster.kill(host).map_err(|e| e.to_string())?;
            println!("killed the {host} host's emulator");
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}

fn start(args: &[&str]) -> Result<(), String> {
    let mut subnet = 1u8;
    let mut extra = String::new();
    let mut i = 0;
    while i < args.len() {
        match (args[i], args.get(i + 1)) {
            ("--subnet", Some(v)) => {
                subnet = v.parse().ok().filter(|n| (1..=254).contains(n)).ok_or("--subnet takes 1..254")?;
            }
            ("--cmdline", Some(v)) => extra = v.to_string(),
            (other, _) => return Err(format!("unknown or incomplete option `{other}`\n{USAGE}")),
        }
        i += 2;
    }
    if !super::is_root() {
        return Err("the cluster needs root (taps, bridges, network namespaces)".into());
    }
    super::ensure_deps()?;
    super::build_kernel()?;
    super::step("starting the cluster (two QEMU TCG hosts; this takes a minute or two)");
    let mut spec = ClusterSpec::new(dir(), "x", subnet);
    spec.cmdline_extra = extra;
    let cluster = Cluster::start(spec).map_err(|e| e.to_string())?;
    println!("{}", cluster.how_to_reach());
    cluster.detach();
    Ok(())
}
