//! `cargo xtask ctl <command> [args] [--addr IP:PORT] [--token-file FILE]`: sends one JSON
//! request to a hypervisor's management API and prints the reply line.
//!
//! The management token (needed by `set`, `checkpoint`, `failover`, `shutdown`, and by every
//! command on a host booted with `mgmt_open=none`) is read from `--token-file`, else from the
//! cluster's scratch directory (`target/cluster/mgmt-token`), else from `target/mgmt-token`
//! (written by `cargo xtask image`), and sent as the request's `"token"` member. It is never
//! printed. `raw` requests are sent as is, without a token.
//!
//! Commands: `status`, `stats`, `tunables`, `set KEY VALUE`, `checkpoint`, `failover`,
//! `shutdown`, and `raw 'JSON'` (sends the text as is, for testing the API's error replies).
//! The address comes from `--addr`, else `COLO_MGMT_ADDR`, else `--cluster primary|secondary` or,
//! when a cluster from `cargo xtask cluster start` is recorded in `target/cluster/`, its primary
//! (the request is sent from the cluster's client namespace), else `10.0.0.1:7070` (the
//! management address from the README's example command line, with the default `mgmt_port`).
//! Exit status: 0 when the reply says `"ok":true`, 1 when it says `"ok":false` or the request
//! could not be sent or answered.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Used when neither `--addr` nor `COLO_MGMT_ADDR` is given.
const DEFAULT_ADDR: &str = "10.0.0.1:7070";
const TIMEOUT: Duration = Duration::from_secs(10);

pub const USAGE: &str = "\
usage: cargo xtask ctl <command> [--addr IP:PORT | --cluster primary|secondary] [--token-file FILE]
commands: status | stats | tunables | set KEY VALUE | checkpoint | failover | shutdown | raw 'JSON'
address: --addr, else $COLO_MGMT_ADDR, else --cluster HOST or the primary of the cluster
         `cargo xtask cluster start` runs (sent from its client namespace), else 10.0.0.1:7070
token: --token-file, else target/cluster/mgmt-token, else target/mgmt-token (from `cargo xtask image`)";

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The `,"token":"..."` member for `token`, or nothing.
fn token_member(token: Option<&str>) -> String {
    token.map(|t| format!(",\"token\":{}", json_string(t))).unwrap_or_default()
}

/// The request line for `args` (without `--addr` and `--token-file`), carrying `token`.
fn request(args: &[String], token: Option<&str>) -> Result<String, String> {
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let token = token_member(token);
    match words.as_slice() {
        [cmd @ ("status" | "stats" | "tunables" | "checkpoint" | "failover" | "shutdown")] => {
            Ok(format!("{{\"cmd\":{}{token}}}", json_string(cmd)))
        }
        ["set", key, value] => {
            let value = if value.bytes().all(|b| b.is_ascii_digit()) && !value.is_empty() {
                value.to_string()
            } else {
                json_string(value)
            };
            Ok(format!("{{\"cmd\":\"set\",\"key\":{},\"value\":{value}{token}}}", json_string(key)))
        }
        ["set", ..] => Err(format!("`set` needs a key and a value: set KEY VALUE\n{USAGE}")),
        ["raw", text] => Ok(text.to_string()),
        [] => Err(format!("no command given\n{USAGE}")),
        [other, ..] => Err(format!("unknown or malformed command `{}`\n{USAGE}", other)),
    }
}

/// Where the token comes from: `--token-file`, else the cluster's, else the image's (the first
/// that exists). `None` when there is none.
fn token_file(explicit: Option<&Path>, target: &Path) -> Result<Option<PathBuf>, String> {
    if let Some(path) = explicit {
        if !path.is_file() {
            return Err(format!("--token-file {}: no such file", path.display()));
        }
        return Ok(Some(path.into()));
    }
    Ok([target.join("cluster/mgmt-token"), target.join("mgmt-token")].into_iter().find(|p| p.is_file()))
}

/// The token in `path`: its content without trailing whitespace (never printed).
fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("reading the token file {}: {e}", path.display()))?;
    let token = text.trim_end().to_string();
    if token.is_empty() || token.contains(|c: char| !c.is_ascii_graphic()) {
        return Err(format!(
            "the token file {} does not hold one token (expected e.g. 64 hex digits on one line)",
            path.display()
        ));
    }
    Ok(token)
}

/// Runs `ctl`.
pub fn ctl(args: &[String]) -> Result<(), String> {
    let mut rest = Vec::new();
    let mut addr = std::env::var("COLO_MGMT_ADDR").ok();
    let mut explicit_token = None;
    let mut cluster_host = None;
    let mut i = 0;
    while i < args.len() {
        if args[i] == "--addr" {
            addr = Some(args.get(i + 1).ok_or("--addr needs a value: --addr IP:PORT")?.clone());
            i += 2;
        } else if args[i] == "--token-file" {
            explicit_token =
                Some(PathBuf::from(args.get(i + 1).ok_or("--token-file needs a value: --token-file FILE")?));
            i += 2;
        } else if args[i] == "--cluster" {
            let host = args.get(i + 1).ok_or("--cluster needs a host: --cluster primary|secondary")?;
            cluster_host = Some(
                qemu_tests::cluster::Host::parse(host)
                    .ok_or_else(|| format!("unknown host `{host}`; accepted: primary|secondary"))?,
            );
            i += 2;
        } else {
            rest.push(args[i].clone());
            i += 1;
        }
    }
    if addr.is_none() {
        let dir = qemu_tests::target_dir().join("cluster");
        let recorded = dir.join(qemu_tests::cluster::STATE_FILE).exists();
        if cluster_host.is_some() || recorded {
            let host = cluster_host.unwrap_or(qemu_tests::cluster::Host::Primary);
            return via_cluster(&dir, host, &rest, explicit_token.as_deref());
        }
    }
    let addr_text = addr.unwrap_or_else(|| DEFAULT_ADDR.into());
    let addr: SocketAddr =
        addr_text.parse().map_err(|_| format!("bad address `{addr_text}`; expected IP:PORT (e.g. 10.0.0.1:7070)"))?;
    let token_path = token_file(explicit_token.as_deref(), &qemu_tests::target_dir())?;
    let token = token_path.as_deref().map(read_token).transpose()?;
    let line = request(&rest, token.as_deref())?;
    let started = Instant::now();
    let mut stream =
        TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(|e| e.to_string())?;
    stream.write_all(format!("{line}\n").as_bytes()).map_err(|e| format!("sending to {addr}: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).map_err(|e| format!("reading the reply from {addr}: {e}"))?;
    let elapsed = started.elapsed();
    if reply.is_empty() {
        return Err(format!("{addr} closed the connection without a reply"));
    }
    print!("{reply}");
    if std::env::var_os("COLO_CTL_TIMING").is_some() {
        eprintln!("ctl: round trip {:.2} ms", elapsed.as_secs_f64() * 1000.0);
    }
    if reply.contains("\"ok\":true") {
        Ok(())
    } else if reply.contains("\"error\":\"unauthorized\"") {
        Err(match &token_path {
            Some(path) => format!("the hypervisor refused the token from {}", path.display()),
            None => "this command needs the management token: give --token-file FILE (no target/cluster/mgmt-token or target/mgmt-token found)".into(),
        })
    } else {
        Err("the hypervisor refused the request (see the reply above)".into())
    }
}

/// Sends the request to a host of the recorded cluster: this program again, inside the
/// cluster's client namespace (the only place its management addresses are reachable from).
fn via_cluster(
    dir: &std::path::Path,
    host: qemu_tests::cluster::Host,
    rest: &[String],
    token_file: Option<&std::path::Path>,
) -> Result<(), String> {
    request(rest, None)?;
    let cluster = qemu_tests::cluster::Cluster::load(dir).map_err(|e| e.to_string())?;
    let addr = format!("{}:{}", cluster.mgmt_ip(host), qemu_tests::cluster::MGMT_PORT);
    let me = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let status = std::process::Command::new("ip")
        .args(["netns", "exec", &cluster.client_netns()])
        .arg(me)
        .arg("ctl")
        .args(rest)
        .args(["--addr", &addr])
        .args(token_file.into_iter().flat_map(|f| [std::ffi::OsStr::new("--token-file"), f.as_os_str()]))
        .status()
        .map_err(|e| format!("cannot run `ip netns exec {}`: {e} (root needed)", cluster.client_netns()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("the {host} host ({addr}) refused the request or did not answer"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(words: &[&str]) -> Result<String, String> {
        request(&words.iter().map(|w| w.to_string()).collect::<Vec<_>>(), None)
    }

    #[test]
    fn the_token_goes_into_every_request_but_raw() {
        let words = |w: &[&str]| w.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        assert_eq!(request(&words(&["shutdown"]), Some("abc")).unwrap(), r#"{"cmd":"shutdown","token":"abc"}"#);
        assert_eq!(
            request(&words(&["set", "heartbeat_ms", "50"]), Some("abc")).unwrap(),
            r#"{"cmd":"set","key":"heartbeat_ms","value":50,"token":"abc"}"#
        );
        assert_eq!(request(&words(&["raw", "{}"]), Some("abc")).unwrap(), "{}");
    }

    #[test]
    fn the_token_file_is_found_in_order() {
        let dir = std::env::temp_dir().join(format!("ctl-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("cluster")).unwrap();
        assert_eq!(token_file(None, &dir).unwrap(), None);
        std::fs::write(dir.join("mgmt-token"), "image-token\n").unwrap();
        assert_eq!(token_file(None, &dir).unwrap(), Some(dir.join("mgmt-token")));
        std::fs::write(dir.join("cluster/mgmt-token"), "cluster-token").unwrap();
        assert_eq!(token_file(None, &dir).unwrap(), Some(dir.join("cluster/mgmt-token")));
        let explicit = dir.join("mine");
        assert!(token_file(Some(&explicit), &dir).unwrap_err().contains("no such file"));
        std::fs::write(&explicit, "mine\n").unwrap();
        assert_eq!(token_file(Some(&explicit), &dir).unwrap(), Some(explicit.clone()));
        assert_eq!(read_token(&explicit).unwrap(), "mine");
        std::fs::write(&explicit, "two words").unwrap();
        assert!(read_token(&explicit).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn requests_are_built() {
        assert_eq!(req(&["status"]).unwrap(), r#"{"cmd":"status"}"#);
        assert_eq!(req(&["set", "heartbeat_ms", "50"]).unwrap(), r#"{"cmd":"set","key":"heartbeat_ms","value":50}"#);
        assert_eq!(req(&["set", "k", "x\"y"]).unwrap(), r#"{"cmd":"set","key":"k","value":"x\"y"}"#);
        assert_eq!(req(&["raw", "garbage"]).unwrap(), "garbage");
        assert!(req(&["set", "k"]).unwrap_err().contains("set KEY VALUE"));
        assert!(req(&["reboot"]).unwrap_err().contains("`reboot`"));
        assert!(req(&[]).is_err());
    }
}
