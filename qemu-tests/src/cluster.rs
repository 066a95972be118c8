//! A two-host COLO cluster on this machine: two emulated hosts (QEMU TCG, `-cpu max`: AMD-V with
//! NPT) booting the same hypervisor and guest image, one as primary and one as secondary.
//!
//! ```text
//!   client namespace ──veth── client bridge ──tap── primary   nic0 (mgmt+client) ┐
//!   (redis-cli ...)                         └─tap── secondary nic0 (mgmt+client) │ same guest,
//!   probe namespace  ──veth── repl bridge   ──tap── primary   nic1 (repl)        │ same MAC/IP
//!   (tests only)                            └─tap── secondary nic1 (repl)        ┘
//! ```
//!
//! Addresses (S = the spec's subnet): client network 10.78.S.0/24 (client .1, primary mgmt .2,
//! secondary mgmt .3, the replicated service .10 port 6379); replication network 10.79.S.0/24
//! (probe .1, primary .2, secondary .3, the secondary listens on port 7000). Nothing is routed to
//! any other interface of the machine; the bridges have no address.
//!
//! A cluster outlives the process that started it (`cargo xtask cluster start` returns with both
//! hosts running): the emulators run in their own process groups and everything needed to find
//! them again is in the state file `<dir>/cluster.state`. [`Cluster::stop`] (and, for a cluster
//! that is not [`Cluster::detach`]ed, `Drop`) kills both emulators and removes the namespaces,
//! veths, taps and bridges. A failed start cleans up everything it made. Needs root.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::{built_kernel, make_image, qemu_command, BootMedium, Emulator, HarnessError, ImageModule, MachineConfig};

/// The state file inside a cluster's directory.
pub const STATE_FILE: &str = "cluster.state";
/// The replicated service's TCP port (guest-redis).
pub const SERVICE_PORT: u16 = 6379;
/// The secondary's replication port.
pub const REPL_PORT: u16 = 7000;
/// The management API port on each host.
pub const MGMT_PORT: u16 = 7070;
/// The line a host prints each time COLO runs (after the full sync of a new link connection).
pub const COLO_RUNNING: &str = "node: COLO running";
/// The line the guest service prints once it listens.
pub const SERVICE_LISTENING: &str = "redis: listening on";
/// How long a host may take to boot and reach the readiness line.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

/// One of the two hosts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    /// Runs the PVM.
    Primary,
    /// Runs the SVM.
    Secondary,
}

impl Host {
    /// Both, primary first.
    pub const BOTH: [Host; 2] = [Host::Primary, Host::Secondary];

    /// `primary` or `secondary`.
    pub fn name(self) -> &'static str {
        match self {
            Host::Primary => "primary",
            Host::Secondary => "secondary",
        }
    }

    /// Parses `primary` or `secondary`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "primary" => Some(Host::Primary),
            "secondary" => Some(Host::Secondary),
            _ => None,
        }
    }

    /// The last octet of this host's addresses.
    fn octet(self) -> u8 {
        match self {
            Host::Primary => 2,
            Host::Secondary => 3,
        }
    }
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which of the cluster's networks a command runs in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Net {
    /// The client namespace on the client bridge (the service's clients).
    Client,
    /// The probe namespace on the replication bridge (tests send bad bytes to the link from it).
    Repl,
}

/// How to build a cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Where the state file, images and serial logs go.
    pub dir: PathBuf,
    /// The third octet of both networks (1..=254); concurrent clusters need different ones.
    pub subnet: u8,
    /// A short tag for interface names (letters and digits, at most 4 used).
    pub tag: String,
    /// Kernel command-line words both hosts get (tunables: `checkpoint_ms=...`, `log=...`).
    pub cmdline_extra: String,
    /// Extra module arguments for the guest.
    pub guest_extra: String,
    /// The guest's disk, in KiB (0: no disk).
    pub disk_kib: usize,
    /// RAM of each emulated host, in MiB.
    pub memory_mib: u32,
    /// Tests: this host gets a cluster key of its own instead of the cluster's.
    pub foreign_key: Option<Host>,
    /// Tests: the primary's `peer_addr=` (e.g. a proxy in the probe namespace) instead of the
    /// secondary's replication endpoint.
    pub primary_peer: Option<String>,
    /// One host only, `role=standalone`, on the same client network and addresses (the
    /// unreplicated baseline of the benchmarks): the primary's slot, no replication NIC.
    pub standalone: bool,
    /// Start a single-node etcd witness in its own namespace on the client/management network
    /// (10.78.S.5:2379) and give both hosts `witness=` and `cluster=`.
    pub witness: bool,
}

impl ClusterSpec {
    /// Defaults: subnet 1, 1 MiB disk, 768 MiB per host.
    pub fn new(dir: impl Into<PathBuf>, tag: &str, subnet: u8) -> Self {
        Self {
            dir: dir.into(),
            subnet,
            tag: tag.into(),
            cmdline_extra: String::new(),
            guest_extra: String::new(),
            disk_kib: 1024,
            memory_mib: 768,
            foreign_key: None,
            primary_peer: None,
            standalone: false,
            witness: false,
        }
    }
}

/// Why a cluster operation failed.
#[derive(Debug)]
pub enum ClusterError {
    /// The harness failed (image, missing tool, timeout with the serial log).
    Harness(HarnessError),
    /// A network command failed.
    Net(String),
    /// No cluster state in the directory.
    NotRunning(PathBuf),
    /// A cluster is already recorded in the directory.
    AlreadyRunning(PathBuf),
    /// The state file is unreadable.
    BadState(String),
    /// A host's emulator exited.
    HostDied {
        /// Which.
        host: Host,
        /// Its serial console.
        serial: String,
    },
    /// Other I/O.
    Io(io::Error),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Harness(e) => write!(f, "{e}"),
            Self::Net(e) => write!(f, "network setup: {e}"),
            Self::NotRunning(dir) => {
                write!(f, "no cluster recorded in {} (start one with `cargo xtask cluster start`)", dir.display())
            }
            Self::AlreadyRunning(dir) => write!(
                f,
                "a cluster is already recorded in {} (see `cargo xtask cluster status`, end it with `cargo xtask cluster stop`)",
                dir.display()
            ),
            Self::BadState(e) => write!(f, "cluster state: {e}"),
            Self::HostDied { host, serial } => write!(f, "the {host} host's emulator exited; serial console:\n{serial}"),
            Self::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

impl std::error::Error for ClusterError {}

impl From<io::Error> for ClusterError {
    fn from(e: io::Error) -> Self {
        Self::Io(e)
    }
}

impl From<HarnessError> for ClusterError {
    fn from(e: HarnessError) -> Self {
        Self::Harness(e)
    }
}

/// The names of everything a cluster creates on this machine, derived from one id.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Names {
    id: String,
}

impl Names {
    fn client_bridge(&self) -> String {
        format!("kb{}", self.id)
    }
    fn repl_bridge(&self) -> String {
        format!("kr{}", self.id)
    }
    fn client_tap(&self, host: Host) -> String {
        format!("k{}{}", if host == Host::Primary { 'p' } else { 's' }, self.id)
    }
    fn repl_tap(&self, host: Host) -> String {
        format!("k{}{}", if host == Host::Primary { 'q' } else { 't' }, self.id)
    }
    fn netns(&self, net: Net) -> String {
        match net {
            Net::Client => format!("colo-c{}", self.id),
            Net::Repl => format!("colo-r{}", self.id),
        }
    }
    /// (bridge end, namespace end) of the veth pair into `net`'s namespace.
    fn veth(&self, net: Net) -> (String, String) {
        match net {
            Net::Client => (format!("kv{}", self.id), format!("kn{}", self.id)),
            Net::Repl => (format!("kw{}", self.id), format!("ko{}", self.id)),
        }
    }
    /// The witness's namespace and its veth pair (bridge end, namespace end).
    fn etcd_netns(&self) -> String {
        format!("colo-e{}", self.id)
    }
    fn etcd_veth(&self) -> (String, String) {
        (format!("ke{}", self.id), format!("kf{}", self.id))
    }
}

/// The witness's etcd client port.
pub const WITNESS_PORT: u16 = 2379;

/// Runs `ip ARGS`, failing with its stderr.
fn ip(args: &[&str]) -> Result<(), ClusterError> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ClusterError::Net(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// A two-host cluster, running or being set up.
#[derive(Debug)]
pub struct Cluster {
    spec: ClusterSpec,
    names: Names,
    pids: BTreeMap<&'static str, u32>,
    /// Emulators this process started (reaped after a kill so no zombie stays).
    children: Vec<std::process::Child>,
    /// When set, dropping this value leaves the cluster running.
    detached: bool,
}

impl Cluster {
    /// Creates the networks and both hosts' images, boots both hosts, and waits until each has
    /// printed [`COLO_RUNNING`] and the primary's guest listens. Everything made is removed on failure.
    pub fn start(spec: ClusterSpec) -> Result<Self, ClusterError> {
        let mut cluster = Self::prepare(spec)?;
        if cluster.spec.standalone {
            cluster.boot(Host::Primary)?;
            cluster.wait_for(Host::Primary, SERVICE_LISTENING, BOOT_TIMEOUT)?;
            return Ok(cluster);
        }
        for host in Host::BOTH {
            cluster.boot(host)?;
        }
        cluster.wait_ready(BOOT_TIMEOUT)?;
        Ok(cluster)
    }

    /// Creates the networks and images without booting a host (tests boot them in any order
    /// with [`Self::boot`]). Everything made is removed on failure or drop.
    pub fn prepare(spec: ClusterSpec) -> Result<Self, ClusterError> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        if spec.dir.join(STATE_FILE).exists() {
            return Err(ClusterError::AlreadyRunning(spec.dir.clone()));
        }
        fs::create_dir_all(&spec.dir)?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let tag: String = spec.tag.chars().filter(char::is_ascii_alphanumeric).take(4).collect();
        // Interface names are at most 15 bytes: 2-letter kind + tag (<= 4) + pid%100000 + counter.
        let names = Names { id: format!("{tag}{}{n}", std::process::id() % 100_000) };
        let cluster = Self { spec, names, pids: BTreeMap::new(), children: Vec::new(), detached: false };
        // From here on, Drop (stop) removes whatever was made.
        cluster.save()?;
        cluster.create_networks()?;
        let _ = fs::remove_file(cluster.spec.dir.join("disk.img"));
        cluster.make_images()?;
        let mut cluster = cluster;
        if cluster.spec.witness {
            cluster.start_witness()?;
        }
        Ok(cluster)
    }

    /// The cluster recorded in `dir` (by `cargo xtask cluster start`), detached: dropping the
    /// value leaves it running.
    pub fn load(dir: &Path) -> Result<Self, ClusterError> {
        let text = fs::read_to_string(dir.join(STATE_FILE)).map_err(|_| ClusterError::NotRunning(dir.into()))?;
        let mut map = BTreeMap::new();
        for line in text.lines() {
            if let Some((k, v)) = line.split_once('=') {
                map.insert(k.to_string(), v.to_string());
            }
        }
        let get = |k: &str| map.get(k).cloned().ok_or_else(|| ClusterError::BadState(format!("no `{k}` in the state")));
        let subnet = get("subnet")?.parse().map_err(|_| ClusterError::BadState("bad subnet".into()))?;
        let mut spec = ClusterSpec::new(dir, &get("tag")?, subnet);
        spec.cmdline_extra = get("cmdline_extra").unwrap_or_default();
        spec.guest_extra = get("guest_extra").unwrap_or_default();
        spec.standalone = get("standalone").is_ok_and(|v| v == "true");
        spec.witness = get("witness").is_ok_and(|w| w == "1");
        let mut pids = BTreeMap::new();
        for name in ["primary", "secondary", "etcd"] {
            if let Some(pid) = map.get(&format!("pid_{name}")).and_then(|p| p.parse().ok()) {
                pids.insert(name, pid);
            }
        }
        Ok(Self { spec, names: Names { id: get("id")? }, pids, children: Vec::new(), detached: true })
    }

    /// Leaves the cluster running when this value is dropped (`cargo xtask cluster start`).
    pub fn detach(mut self) {
        self.detached = true;
    }

    fn save(&self) -> Result<(), ClusterError> {
        let mut text = format!(
            "id={}\ntag={}\nsubnet={}\ncmdline_extra={}\nguest_extra={}\nstandalone={}\nwitness={}\n",
            self.names.id,
            self.spec.tag,
            self.spec.subnet,
            self.spec.cmdline_extra,
            self.spec.guest_extra,
            self.spec.standalone,
            u8::from(self.spec.witness)
        );
        for (host, pid) in &self.pids {
            text += &format!("pid_{host}={pid}\n");
        }
        fs::write(self.spec.dir.join(STATE_FILE), text)?;
        Ok(())
    }

    /// The replicated service, `IP:PORT`.
    pub fn service(&self) -> String {
        format!("{}:{SERVICE_PORT}", self.service_ip())
    }

    /// The replicated service's address.
    pub fn service_ip(&self) -> String {
        format!("10.78.{}.10", self.spec.subnet)
    }

    /// A host's management address.
    pub fn mgmt_ip(&self, host: Host) -> String {
        format!("10.78.{}.{}", self.spec.subnet, host.octet())
    }

    /// A host's replication address.
    pub fn repl_ip(&self, host: Host) -> String {
        format!("10.79.{}.{}", self.spec.subnet, host.octet())
    }

    /// The client namespace's name.
    pub fn client_netns(&self) -> String {
        self.names.netns(Net::Client)
    }

    /// A host's serial log file.
    pub fn serial_path(&self, host: Host) -> PathBuf {
        self.spec.dir.join(format!("{host}.serial.log"))
    }

    /// A host's serial console so far.
    pub fn serial(&self, host: Host) -> String {
        fs::read(self.serial_path(host)).map(|b| String::from_utf8_lossy(&b).into_owned()).unwrap_or_default()
    }

    fn image_path(&self, host: Host) -> PathBuf {
        self.spec.dir.join(format!("{host}.img"))
    }

    /// The kernel command line of `host`.
    pub fn cmdline(&self, host: Host) -> String {
        self.cmdline_as(host, host)
    }

    /// The kernel command line of the `host` slot (its addresses) running as `role`.
    pub fn cmdline_as(&self, host: Host, role: Host) -> String {
        let s = self.spec.subnet;
        if self.spec.standalone {
            return format!(
                "role=standalone mgmt_addr={}/24 nics=mgmt+client guest_mem=32M on_idle=halt {}",
                self.mgmt_ip(Host::Primary),
                self.spec.cmdline_extra
            )
            .trim_end()
            .to_string();
        }
        let peer = match host {
            Host::Primary => self.spec.primary_peer.clone().unwrap_or_else(|| format!("10.79.{s}.3:{REPL_PORT}")),
            Host::Secondary => format!("10.79.{s}.2:{REPL_PORT}"),
        };
        let witness = if self.spec.witness {
            format!("witness={}:{WITNESS_PORT} cluster=colo-{s} ", self.witness_ip())
        } else {
            String::new()
        };
        // `role=` in the extra words replaces the host's (a standalone host for comparisons).
        let own_role = self.spec.cmdline_extra.split_whitespace().any(|w| w.starts_with("role="));
        let role = if own_role { String::new() } else { format!("role={role} ") };
        format!(
            "{role}mgmt_addr={}/24 nics=mgmt+client,repl repl_addr={}/24 repl_port={REPL_PORT} peer_addr={peer} guest_mem=32M on_idle=halt {witness}{}",
            self.mgmt_ip(host),
            self.repl_ip(host),
            self.spec.cmdline_extra
        )
        .trim_end()
        .to_string()
    }

    /// The witness's address on the client/management network.
    pub fn witness_ip(&self) -> String {
        format!("10.78.{}.5", self.spec.subnet)
    }

    /// Starts the single-node etcd witness in its own namespace, its data in the state
    /// directory, and waits until `/health` answers.
    fn start_witness(&mut self) -> Result<(), ClusterError> {
        let ns = self.names.etcd_netns();
        let (veth_host, veth_ns) = self.names.etcd_veth();
        ip(&["netns", "add", &ns])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["link", "add", &veth_host, "type", "veth", "peer", "name", &veth_ns])?;
        ip(&["link", "set", &veth_ns, "netns", &ns])?;
        ip(&["link", "set", &veth_host, "master", &self.names.client_bridge(), "up"])?;
        let addr = self.witness_ip();
        ip(&["-n", &ns, "addr", "add", &format!("{addr}/24"), "dev", &veth_ns])?;
        ip(&["-n", &ns, "link", "set", &veth_ns, "up"])?;
        let data = self.spec.dir.join("etcd-data");
        let _ = fs::remove_dir_all(&data);
        let url = format!("http://{addr}:{WITNESS_PORT}");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns, "etcd", "--name", "w", "--data-dir"])
            .arg(&data)
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380", "--initial-advertise-peer-urls"])
            .args(["http://127.0.0.1:2380", "--initial-cluster", "w=http://127.0.0.1:2380", "--unsafe-no-fsync"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(self.spec.dir.join("etcd.log"))?))
            .process_group(0)
            .spawn()
            .map_err(|e| ClusterError::Net(format!("cannot start etcd ({e}): install it with `cargo xtask deps`")))?;
        self.pids.insert("etcd", child.id());
        self.children.push(child);
        self.save()?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", &ns, "curl", "-s", "-m", "1", &format!("{url}/health")])
                .output()?;
            if String::from_utf8_lossy(&out.stdout).contains("true") {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ClusterError::Net(format!(
                    "etcd at {url} not healthy within 20 s; log:\n{}",
                    fs::read_to_string(self.spec.dir.join("etcd.log")).unwrap_or_default()
                )));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Takes the witness off the network (its veth down) or puts it back.
    pub fn witness_reachable(&self, up: bool) -> Result<(), ClusterError> {
        ip(&["link", "set", &self.names.etcd_veth().0, if up { "up" } else { "down" }])
    }

    /// `ETCDCTL`-free read of a key from the witness (from its namespace, with curl): the
    /// value, if the key exists.
    pub fn witness_get(&self, key: &str) -> Option<String> {
        let body = format!("{{\"key\":\"{}\"}}", base64(key.as_bytes()));
        let url = format!("http://{}:{WITNESS_PORT}/v3/kv/range", self.witness_ip());
        let out = Command::new("ip")
            .args(["netns", "exec", &self.names.etcd_netns(), "curl", "-s", "-m", "2", "-X", "POST", &url, "-d", &body])
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let value = text.split("\"value\":\"").nth(1)?.split('"').next()?;
        String::from_utf8(unbase64(value)?).ok()
    }

    /// The guest's MAC (the same on both hosts).
    pub fn guest_mac(&self) -> String {
        format!("52:54:00:c0:{:02x}:10", self.spec.subnet)
    }

    /// Counts the frames `host` sends on the client network with source MAC `mac` during
    /// `secs` seconds (an AF_PACKET capture on its client tap).
    pub fn count_frames_from(&self, host: Host, mac: &str, secs: u32) -> Result<u64, ClusterError> {
        let script = r#"
import socket, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind((sys.argv[1], 0))
s.settimeout(0.2)
mac = bytes.fromhex(sys.argv[2].replace(':', ''))
end = time.time() + float(sys.argv[3])
n = 0
while time.time() < end:
    try:
        f, a = s.recvfrom(65535)
    except socket.timeout:
        continue
    if a[2] != socket.PACKET_OUTGOING and f[6:12] == mac:
        n += 1
print(n)
"#;
        let out = Command::new("python3")
            .args(["-c", script, &self.names.client_tap(host), mac, &secs.to_string()])
            .output()?;
        String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|_| {
            ClusterError::Net(format!(
                "capture on {}: {}",
                self.names.client_tap(host),
                String::from_utf8_lossy(&out.stderr)
            ))
        })
    }

    /// Cuts the replication network (both hosts' repl taps down): both hosts stay alive.
    pub fn cut_link(&self) -> Result<(), ClusterError> {
        for host in Host::BOTH {
            ip(&["link", "set", &self.names.repl_tap(host), "down"])?;
        }
        Ok(())
    }

    /// Heals the replication network cut by [`Self::cut_link`].
    pub fn heal_link(&self) -> Result<(), ClusterError> {
        for host in Host::BOTH {
            ip(&["link", "set", &self.names.repl_tap(host), "up"])?;
        }
        Ok(())
    }

    /// Reboots the `host` slot (its addresses) as a new secondary: it joins whichever host
    /// serves (re-protection). The slot's emulator must not be running.
    pub fn restart_as_secondary(&mut self, host: Host) -> Result<(), ClusterError> {
        if self.alive(host) {
            return Err(ClusterError::BadState(format!("the {host} host is still running: kill it first")));
        }
        let kernel = built_kernel()?;
        let modules = self.modules(host)?;
        make_image(&kernel, &self.cmdline_as(host, Host::Secondary), &modules, &self.image_path(host))?;
        self.boot(host)
    }

    fn create_networks(&self) -> Result<(), ClusterError> {
        let s = self.spec.subnet;
        for (bridge, net, cidr) in [
            (self.names.client_bridge(), Net::Client, format!("10.78.{s}.1/24")),
            (self.names.repl_bridge(), Net::Repl, format!("10.79.{s}.1/24")),
        ] {
            ip(&["link", "add", &bridge, "type", "bridge"])?;
            ip(&["link", "set", &bridge, "up"])?;
            let ns = self.names.netns(net);
            let (veth_host, veth_ns) = self.names.veth(net);
            ip(&["netns", "add", &ns])?;
            ip(&["link", "add", &veth_host, "type", "veth", "peer", "name", &veth_ns])?;
            ip(&["link", "set", &veth_ns, "netns", &ns])?;
            ip(&["link", "set", &veth_host, "master", &bridge, "up"])?;
            ip(&["-n", &ns, "addr", "add", &cidr, "dev", &veth_ns])?;
            ip(&["-n", &ns, "link", "set", &veth_ns, "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        for host in Host::BOTH {
            for (tap, bridge) in [
                (self.names.client_tap(host), self.names.client_bridge()),
                (self.names.repl_tap(host), self.names.repl_bridge()),
            ] {
                ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
                ip(&["link", "set", &tap, "master", &bridge, "up"])?;
            }
        }
        Ok(())
    }

    fn make_images(&self) -> Result<(), ClusterError> {
        let kernel = built_kernel()?;
        // One management token per cluster, in its state directory (where `cargo xtask ctl`
        // looks for it); never on a command line.
        crate::write_mgmt_token(&self.token_path())?;
        let _ = fs::remove_file(self.cluster_key_path());
        let hosts: &[Host] = if self.spec.standalone { &[Host::Primary] } else { &Host::BOTH };
        for &host in hosts {
            let modules = self.modules(host)?;
            make_image(&kernel, &self.cmdline(host), &modules, &self.image_path(host))?;
        }
        Ok(())
    }

    /// The image modules: the guest, its disk (written fresh only when missing), the token.
    fn modules(&self, host: Host) -> Result<Vec<ImageModule>, ClusterError> {
        let redis = crate::guests::guest_path("guest-redis");
        if !redis.is_file() {
            return Err(HarnessError::Missing { path: redis, hint: "build it with `cargo xtask build`" }.into());
        }
        let s = self.spec.subnet;
        let disk_arg = if self.spec.disk_kib > 0 { "disk=data " } else { "" };
        let guest_args = format!(
            "ip=10.78.{s}.10/24 mac=52:54:00:c0:{s:02x}:10 {disk_arg}time_limit_ms=86400000 {}",
            self.spec.guest_extra
        );
        let mut modules =
            vec![ImageModule { path: redis, name: "guest-redis".into(), args: guest_args.trim_end().into() }];
        if self.spec.disk_kib > 0 {
            let disk = self.spec.dir.join("disk.img");
            if !disk.exists() {
                fs::write(&disk, vec![0u8; self.spec.disk_kib * 1024])?;
            }
            modules.push(ImageModule { path: disk, name: "disk-data".into(), args: String::new() });
        }
        modules.push(crate::mgmt_token_module(&self.token_path()));
        // One cluster key (32 random bytes, 0600) for both hosts, unless a test gives one host a
        // key of its own.
        let key = if self.spec.foreign_key == Some(host) {
            let path = self.spec.dir.join(format!("cluster-key.{host}"));
            crate::write_cluster_key(&path)?;
            path
        } else {
            if !self.cluster_key_path().exists() {
                crate::write_cluster_key(&self.cluster_key_path())?;
            }
            self.cluster_key_path()
        };
        modules.push(crate::cluster_key_module(&key));
        Ok(modules)
    }

    /// The cluster key file both hosts' `cluster-key` module carries (`cluster-key` in the state
    /// directory).
    pub fn cluster_key_path(&self) -> PathBuf {
        self.spec.dir.join("cluster-key")
    }

    /// The cluster's management token file (`mgmt-token` in its state directory).
    pub fn token_path(&self) -> PathBuf {
        self.spec.dir.join("mgmt-token")
    }

    /// Boots `host`'s emulator (in its own process group, so it outlives this process).
    pub fn boot(&mut self, host: Host) -> Result<(), ClusterError> {
        let serial = self.serial_path(host);
        fs::write(&serial, b"")?;
        let mut config = MachineConfig::new(Emulator::Qemu, BootMedium::Cdrom, &self.image_path(host));
        config.memory_mib = self.spec.memory_mib;
        let s = self.spec.subnet;
        let o = host.octet();
        config.extra = vec![
            "-netdev".into(),
            format!("tap,id=client,ifname={},script=no,downscript=no", self.names.client_tap(host)),
            "-device".into(),
            format!("e1000,netdev=client,mac=52:54:00:78:{s:02x}:{o:02x},addr=0x3"),
        ];
        if !self.spec.standalone {
            config.extra.extend([
                "-netdev".into(),
                format!("tap,id=repl,ifname={},script=no,downscript=no", self.names.repl_tap(host)),
                "-device".into(),
                format!("e1000,netdev=repl,mac=52:54:00:79:{s:02x}:{o:02x},addr=0x4"),
            ]);
        }
        let mut command = qemu_command(&config, &serial)?;
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(fs::File::create(self.spec.dir.join(format!("{host}.emulator.out")))?))
            .stderr(Stdio::from(fs::File::create(self.spec.dir.join(format!("{host}.emulator.err")))?))
            .process_group(0)
            .spawn()
            .map_err(|error| HarnessError::Spawn {
                program: "qemu-system-x86_64".into(),
                error,
                hint: "install the emulators with `cargo xtask deps`",
            })?;
        self.pids.insert(host.name(), child.id());
        // `stop`/`kill` end it; dropping the handle does not (and once this process is gone,
        // init reaps it).
        self.children.push(child);
        self.save()
    }

    /// Whether `host`'s emulator is running.
    pub fn alive(&self, host: Host) -> bool {
        self.pids.get(host.name()).is_some_and(|&pid| is_our_emulator(pid))
    }

    /// Waits until `host`'s serial console has a line containing `needle`; returns the console.
    pub fn wait_for(&self, host: Host, needle: &str, timeout: Duration) -> Result<String, ClusterError> {
        self.wait_for_count(host, needle, 1, timeout)
    }

    /// Waits until `needle` appears `count` times on `host`'s serial console.
    pub fn wait_for_count(
        &self,
        host: Host,
        needle: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<String, ClusterError> {
        let deadline = Instant::now() + timeout;
        loop {
            let serial = self.serial(host);
            if serial.matches(needle).count() >= count {
                return Ok(serial);
            }
            if !self.alive(host) {
                thread::sleep(Duration::from_millis(200));
                if self.alive(host) {
                    continue;
                }
                let pid = self.pids.get(host.name()).copied().unwrap_or(0);
                let status = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                eprintln!(
                    "cluster: {host} pid {pid} not alive: stat `{}` cmdline `{}`",
                    status.trim(),
                    String::from_utf8_lossy(&cmdline).replace('\0', " ")
                );
                let err = fs::read_to_string(self.spec.dir.join(format!("{host}.emulator.err"))).unwrap_or_default();
                return Err(ClusterError::HostDied { host, serial: format!("{}{err}", self.serial(host)) });
            }
            if Instant::now() > deadline {
                return Err(HarnessError::Timeout {
                    what: format!("`{needle}` (x{count}) on the {host} host's serial console"),
                    after: timeout,
                    serial,
                }
                .into());
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until both hosts report COLO running and the primary's guest listens.
    pub fn wait_ready(&self, timeout: Duration) -> Result<(), ClusterError> {
        let started = Instant::now();
        self.wait_for(Host::Primary, SERVICE_LISTENING, timeout.saturating_sub(started.elapsed()))?;
        for host in Host::BOTH {
            self.wait_for(host, COLO_RUNNING, timeout.saturating_sub(started.elapsed()))?;
        }
        Ok(())
    }

    /// A command that runs `program` inside `net`'s namespace.
    pub fn command(&self, net: Net, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.names.netns(net), program]);
        c
    }

    /// Runs `program args` inside `net`'s namespace under `timeout_s` seconds (stdin closed).
    pub fn run(&self, net: Net, program: &str, args: &[&str], timeout_s: u32) -> Output {
        let mut c = Command::new("timeout");
        c.arg(timeout_s.to_string()).args(["ip", "netns", "exec", &self.names.netns(net), program]).args(args);
        c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("running {program}: {e}"))
    }

    /// One JSON request to `host`'s management API (from the client namespace); the reply line.
    pub fn mgmt(&self, host: Host, request: &str) -> Result<String, ClusterError> {
        // Every request carries the cluster's token (mutating commands need it; the others
        // ignore it), as `cargo xtask ctl` sends it.
        let authed;
        let request = match (request.trim_start().strip_prefix('{'), fs::read_to_string(self.token_path())) {
            (Some(rest), Ok(token)) if !request.contains("\"token\"") => {
                authed = format!("{{\"token\":\"{}\",{rest}", token.trim());
                authed.as_str()
            }
            _ => request,
        };
        let script = format!(
            "exec 3<>/dev/tcp/{}/{MGMT_PORT} && printf '%s\\n' \"$1\" >&3 && head -n 1 <&3",
            self.mgmt_ip(host)
        );
        let out = self.run(Net::Client, "bash", &["-c", &script, "mgmt", request], 15);
        let reply = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !reply.is_empty() {
            Ok(reply)
        } else {
            Err(ClusterError::Net(format!(
                "no reply from the {host} host's management API at {}:{MGMT_PORT}: {}",
                self.mgmt_ip(host),
                String::from_utf8_lossy(&out.stderr).trim()
            )))
        }
    }

    /// A human summary: the service line, then each host's emulator and management status.
    pub fn status(&self) -> String {
        let mut text = format!("service: {}\n", self.service());
        for host in Host::BOTH {
            let pid = self.pids.get(host.name()).map_or("-".to_string(), u32::to_string);
            let state = if self.alive(host) { "running" } else { "not running" };
            text += &format!(
                "{host}: emulator {state} (pid {pid}), mgmt {}:{MGMT_PORT}, repl {}, serial {}\n",
                self.mgmt_ip(host),
                self.repl_ip(host),
                self.serial_path(host).display()
            );
            if self.alive(host) {
                match self.mgmt(host, "{\"cmd\":\"status\"}") {
                    Ok(reply) => text += &format!("  status: {reply}\n"),
                    Err(e) => text += &format!("  status: {e}\n"),
                }
            }
        }
        text
    }

    /// How a person reaches the service.
    pub fn how_to_reach(&self) -> String {
        format!(
            "service: {service}\n\
             reach it from the client namespace `{ns}`:\n  \
             cargo xtask cluster exec -- redis-cli -h {ip} -p {SERVICE_PORT} set k v\n  \
             ip netns exec {ns} redis-cli -h {ip} get k\n\
             management: primary {p}:{MGMT_PORT}, secondary {s}:{MGMT_PORT} (cargo xtask cluster status)\n\
             serial logs: {dir}/primary.serial.log, {dir}/secondary.serial.log\n\
             end it with `cargo xtask cluster stop`",
            service = self.service(),
            ns = self.client_netns(),
            ip = self.service_ip(),
            p = self.mgmt_ip(Host::Primary),
            s = self.mgmt_ip(Host::Secondary),
            dir = self.spec.dir.display(),
        )
    }

    /// `kill -9` of `host`'s emulator (a host failure).
    pub fn kill(&mut self, host: Host) -> Result<(), ClusterError> {
        match self.pids.get(host.name()) {
            Some(&pid) if is_our_emulator(pid) => {
                kill_emulator(pid, &mut self.children);
                Ok(())
            }
            _ => Err(ClusterError::BadState(format!("the {host} host is not running"))),
        }
    }

    /// Kills both emulators and removes the namespaces, veths, taps, bridges and the state file
    /// (serial logs stay for inspection). Safe to call more than once.
    pub fn stop(&mut self) {
        for host in Host::BOTH {
            if let Some(pid) = self.pids.remove(host.name()) {
                kill_emulator(pid, &mut self.children);
            }
        }
        if let Some(pid) = self.pids.remove("etcd") {
            if is_pid_named(pid, "etcd") {
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            }
            for child in self.children.iter_mut().filter(|c| c.id() == pid) {
                let _ = child.wait();
            }
        }
        let _ = ip(&["netns", "del", &self.names.etcd_netns()]);
        let _ = ip(&["link", "del", &self.names.etcd_veth().0]);
        let _ = fs::remove_dir_all(self.spec.dir.join("etcd-data"));
        for net in [Net::Client, Net::Repl] {
            let _ = ip(&["netns", "del", &self.names.netns(net)]);
            let _ = ip(&["link", "del", &self.names.veth(net).0]);
        }
        for host in Host::BOTH {
            let _ = ip(&["link", "del", &self.names.client_tap(host)]);
            let _ = ip(&["link", "del", &self.names.repl_tap(host)]);
        }
        let _ = ip(&["link", "del", &self.names.client_bridge()]);
        let _ = ip(&["link", "del", &self.names.repl_bridge()]);
        let _ = fs::remove_file(self.spec.dir.join(STATE_FILE));
        for host in Host::BOTH {
            let _ = fs::remove_file(self.image_path(host));
        }
        let _ = fs::remove_file(self.spec.dir.join("disk.img"));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if !self.detached {
            self.stop();
        }
    }
}

/// Kills `pid` (if it is still our emulator) and waits until it is gone.
fn kill_emulator(pid: u32, children: &mut [std::process::Child]) {
    if is_our_emulator(pid) {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    for child in children.iter_mut().filter(|c| c.id() == pid) {
        let _ = child.wait();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while is_our_emulator(pid) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Decodes standard base64 (padding optional); `None` on a character outside the alphabet.
fn unbase64(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        acc = acc << 6 | B64.iter().position(|&b| b == c)? as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

/// Whether `pid` runs a program whose command line contains `name` (and is not a zombie).
fn is_pid_named(pid: u32, name: &str) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains(name)
}

/// Whether `pid` is a running QEMU (not a reused pid of something else, not a zombie).
fn is_our_emulator(pid: u32) -> bool {
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains("qemu-system")
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_round_trips() {
        for text in ["", "a", "ab", "abc", "colo/colo-1/gen/2", "167772162"] {
            assert_eq!(super::unbase64(&super::base64(text.as_bytes())).unwrap(), text.as_bytes());
        }
        assert_eq!(super::base64(b"colo"), "Y29sbw==");
        assert_eq!(super::unbase64("!"), None);
    }
}
