//! Test networks on this machine: a Linux bridge, a tap for the emulated host's NIC, and a client
//! in its own network namespace joined to the bridge by a veth pair. Names are unique per test
//! (a short tag plus the process id and a counter); everything is removed in `Drop`, which also
//! runs when a test panics. Needs root (`ip` from iproute2).
//!
//! Addresses are the caller's choice and live only inside the namespace; nothing is routed to
//! any other interface of the machine (the bridge itself has no address).

use std::io;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// One bridge + tap + namespace set.
#[derive(Debug)]
pub struct TestNet {
    /// The bridge (no address).
    pub bridge: String,
    /// The tap QEMU attaches to (`-netdev tap,ifname=...`).
    pub tap: String,
    /// The client's namespace.
    pub netns: String,
    /// The veth end on the bridge.
    pub veth_host: String,
    /// The veth end inside the namespace.
    pub veth_ns: String,
    /// The client's address with prefix, e.g. `10.77.3.1/24`.
    pub client_cidr: String,
}

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> io::Result<Output> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl TestNet {
    /// Creates the bridge, tap, namespace and veth pair; the client gets `client_cidr` (which
    /// must be in a private range).
    pub fn new(tag: &str, client_cidr: &str) -> io::Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // Interface names are at most 15 bytes: 2-letter kind + tag (<= 4) + pid%100000 + counter.
        let tag: String = tag.chars().filter(char::is_ascii_alphanumeric).take(4).collect();
        let id = format!("{tag}{}{n}", std::process::id() % 100_000);
        let net = Self {
            bridge: format!("cb{id}"),
            tap: format!("ct{id}"),
            netns: format!("colo-{id}"),
            veth_host: format!("cv{id}"),
            veth_ns: format!("cn{id}"),
            client_cidr: client_cidr.into(),
        };
        // From here on, Drop removes whatever was created.
        net.create()?;
        Ok(net)
    }

    fn create(&self) -> io::Result<()> {
        ip(&["link", "add", &self.bridge, "type", "bridge"])?;
        ip(&["link", "set", &self.bridge, "up"])?;
        ip(&["tuntap", "add", "dev", &self.tap, "mode", "tap"])?;
        ip(&["link", "set", &self.tap, "master", &self.bridge, "up"])?;
        ip(&["netns", "add", &self.netns])?;
        ip(&["link", "add", &self.veth_host, "type", "veth", "peer", "name", &self.veth_ns])?;
        ip(&["link", "set", &self.veth_ns, "netns", &self.netns])?;
        ip(&["link", "set", &self.veth_host, "master", &self.bridge, "up"])?;
        ip(&["-n", &self.netns, "addr", "add", &self.client_cidr, "dev", &self.veth_ns])?;
        ip(&["-n", &self.netns, "link", "set", &self.veth_ns, "up"])?;
        ip(&["-n", &self.netns, "link", "set", "lo", "up"])?;
        Ok(())
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.netns, program]);
        c
    }

    /// Runs `program args` inside the namespace under `timeout` seconds (stdin closed), panicking
    /// only if it cannot be started at all.
    pub fn run(&self, program: &str, args: &[&str], timeout_s: u32) -> Output {
        let mut c = Command::new("timeout");
        c.arg(timeout_s.to_string()).args(["ip", "netns", "exec", &self.netns, program]).args(args);
        c.stdin(std::process::Stdio::null()).output().unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    /// QEMU arguments for an e1000 on this network's tap with `mac`.
    pub fn qemu_nic_args(&self, id: &str, mac: &str) -> Vec<String> {
        vec![
            "-netdev".into(),
            format!("tap,id={id},ifname={},script=no,downscript=no", self.tap),
            "-device".into(),
            format!("e1000,netdev={id},mac={mac}"),
        ]
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting the namespace removes the veth pair with it; delete the host end too in case
        // the move into the namespace never happened.
        let _ = ip(&["netns", "del", &self.netns]);
        let _ = ip(&["link", "del", &self.veth_host]);
        let _ = ip(&["link", "del", &self.tap]);
        let _ = ip(&["link", "del", &self.bridge]);
    }
}

/// Whether this process may create network devices (root with `ip` available).
pub fn available() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        && Command::new("ip").arg("-V").output().is_ok()
}
