//! `cargo xtask cluster start | status | stop | exec -- CMD... | kill primary|secondary |
//! cut-link | heal-link | restart primary|secondary | witness-down | witness-up`: a two-host
//! COLO cluster with an etcd witness on this machine (`qemu_tests::cluster`), kept in
//! `target/cluster/`.

use std::process::Command;

use qemu_tests::cluster::{Cluster, ClusterSpec, Host};
use qemu_tests::target_dir;

pub const USAGE: &str = "\
usage: cargo xtask cluster <command>
commands:
  start [--subnet N] [--cmdline \"key=value ...\"] [--no-witness]
                        build, start a single-node etcd witness (own namespace, data in the state
                        directory), boot the primary and the secondary (QEMU TCG, AMD-V), wait until
                        the replication link is up and the service listens, print `service: IP:PORT`
                        (--no-witness: witness=none, only `ctl failover` promotes)
  status                the service line and each host's emulator and management status
  stop                  kill both hosts and remove the namespaces, taps and bridges
  exec -- CMD [ARGS]    run CMD in the client network namespace (e.g. redis-cli -h IP set k v)
  kill primary|secondary
                        kill -9 one host's emulator (a host failure)
  cut-link | heal-link  take the replication network down (both hosts' repl taps) / back up
  restart primary|secondary
                        boot that (killed or fenced) host slot again as a new secondary: it joins
                        the serving host by itself (re-protection)
  witness-down | witness-up
                        take the etcd witness off the network / put it back";

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
        ["cut-link"] | ["heal-link"] | ["witness-down"] | ["witness-up"] => {
            let cluster = Cluster::load(&dir()).map_err(|e| e.to_string())?;
            let r = match words[0] {
                "cut-link" => cluster.cut_link(),
                "heal-link" => cluster.heal_link(),
                "witness-down" => cluster.witness_reachable(false),
                _ => cluster.witness_reachable(true),
            };
            r.map_err(|e| e.to_string())?;
            println!("{}: done", words[0]);
            Ok(())
        }
        ["restart", host] => {
            let host =
                Host::parse(host).ok_or_else(|| format!("unknown host `{host}`; accepted: primary|secondary"))?;
            let mut cluster = Cluster::load(&dir()).map_err(|e| e.to_string())?;
            if cluster.alive(host) {
                cluster.kill(host).map_err(|e| e.to_string())?;
            }
            cluster.restart_as_secondary(host).map_err(|e| e.to_string())?;
            println!("the {host} slot boots as a new secondary; it joins the serving host by itself");
            Ok(())
        }
        _ => Err(USAGE.into()),
    }
}

fn start(args: &[&str]) -> Result<(), String> {
    let mut subnet = 1u8;
    let mut extra = String::new();
    let mut witness = true;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--no-witness" {
            witness = false;
            i += 1;
            continue;
        }
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
    spec.witness = witness;
    let cluster = Cluster::start(spec).map_err(|e| e.to_string())?;
    println!("{}", cluster.how_to_reach());
    cluster.detach();
    Ok(())
}
