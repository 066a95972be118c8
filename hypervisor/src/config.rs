//! The hypervisor's configuration, parsed from the kernel command line.
//!
//! The command line is a list of `key=value` words separated by spaces (GRUB may put the kernel's
//! path first; a leading word that starts with `/` is skipped). Every key has one accepted form,
//! listed in [`KEYS`]; an unknown key, a missing value, a repeated key or a value that does not
//! parse stops the boot with a [`ConfigError`] that names the key, the value and the accepted form.
#![deny(unsafe_code)]

use core::fmt;
use core::net::{Ipv4Addr, SocketAddrV4};

/// What this host does in the COLO pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Runs the PVM, holds its output in the comparator, streams checkpoints.
    Primary,
    /// Runs the SVM, applies checkpoints, takes over when the primary dies.
    Secondary,
    /// Runs guests without replication.
    Standalone,
}

/// What the hypervisor does once it has nothing left to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnIdle {
    /// Leave the emulator with the success status (isa-debug-exit / Bochs shutdown port).
    Exit,
    /// Halt the CPU forever (bare metal, or to inspect the machine).
    Halt,
}

/// How the primary decides when PVM output may leave (`mode=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// COLO: output leaves once the SVM's output matches it, or a committed checkpoint covers it.
    Colo,
    /// Output buffering (Remus-style baseline): every frame waits for the periodic checkpoint
    /// (`checkpoint_ms`) that covers it to commit; nothing is compared.
    Buffer,
}

/// A deliberate fault raised after boot, to test the exception path. Test use only.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TestFault {
    /// `int3`: vector 3, no error code.
    Breakpoint,
    /// `ud2`: vector 6.
    InvalidOpcode,
    /// A read of the unmapped null page: vector 14 with CR2 = 0.
    PageFault,
    /// A Rust `panic!`: exercises the panic handler rather than the IDT.
    Panic,
}

/// Which management requests are open to clients without the management token (`mgmt_open=`).
/// Mutating commands always need the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MgmtOpen {
    /// `status`, `stats`, `tunables` and `/metrics` are open (the default).
    Read,
    /// Every request needs the token (`Authorization: Bearer` for `/metrics`).
    None,
}

/// An IPv4 address with its prefix length, such as `10.0.0.1/24`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// The prefix length, 0..=32.
    pub prefix: u8,
}

/// Most host NICs the `nics=` key can describe.
pub const MAX_NICS: usize = 4;

/// The roles one host NIC carries (`nics=` key): management, client traffic, replication link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicRoles {
    /// Carries the management address (JSON API, metrics).
    pub mgmt: bool,
    /// Carries client traffic to and from the guests.
    pub client: bool,
    /// Carries the replication link to the peer host.
    pub repl: bool,
}

impl NicRoles {
    /// Every role.
    pub const ALL: NicRoles = NicRoles { mgmt: true, client: true, repl: true };
}

impl fmt::Display for NicRoles {
    /// `mgmt+client`, as written on the command line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut sep = "";
        for (on, name) in [(self.mgmt, "mgmt"), (self.client, "client"), (self.repl, "repl")] {
            if on {
                write!(f, "{sep}{name}")?;
                sep = "+";
            }
        }
        Ok(())
    }
}

/// The parsed configuration. Every field has a default except where a role requires it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// `role=`.
    pub role: Role,
    /// `guest_mem=`: RAM given to each guest, in bytes.
    pub guest_mem_bytes: u64,
    /// `mgmt_addr=`: the management endpoint's address on the management network.
    pub mgmt_addr: Option<Ipv4Cidr>,
    /// `peer_addr=`: the other host's replication endpoint.
    pub peer_addr: Option<SocketAddrV4>,
    /// `heartbeat_ms=`: interval between heartbeats on the replication link.
    pub heartbeat_ms: u32,
    /// `checkpoint_ms=`: the periodic checkpoint interval.
    pub checkpoint_ms: u32,
    /// `log=`: the most verbose level printed on the serial console.
    pub log_level: log::LevelFilter,
    /// `on_idle=`.
    pub on_idle: OnIdle,
    /// `test_fault=`: raise a deliberate fault after boot.
    pub test_fault: Option<TestFault>,
    /// `mgmt_port=`: TCP port of the JSON management API on the management address.
    pub mgmt_port: u16,
    /// `metrics_port=`: TCP port of the Prometheus metrics page on the management address.
    pub metrics_port: u16,
    /// `mgmt_gw=`: default gateway of the management network, if any.
    pub mgmt_gw: Option<Ipv4Addr>,
    /// `nics=`: the roles of each host NIC, in PCI enumeration order.
    pub nics: heapless::Vec<NicRoles, MAX_NICS>,
    /// `repl_addr=`: this host's address on the replication network (NIC with the `repl` role).
    pub repl_addr: Option<Ipv4Cidr>,
    /// `repl_port=`: the TCP port the secondary listens on for the replication link.
    pub repl_port: u16,
    /// `compare_timeout_ms=`: a PVM frame held longer than this without a match forces a
    /// checkpoint.
    pub compare_timeout_ms: u32,
    /// `checkpoint_verify=`: each commit record carries a digest of the PVM's RAM and disk, which
    /// the secondary checks after the apply.
    pub checkpoint_verify: bool,
    /// `queue_limit=`: PVM frames the comparator may hold before queue pressure forces a
    /// checkpoint.
    pub queue_limit: u32,
    /// `mgmt_open=`: which management requests need no token.
    pub mgmt_open: MgmtOpen,
    /// `repl_auth=`: the replication link runs the cluster-key handshake and seals every
    /// message (`on`, the default); `off` exists only for benchmarks.
    pub repl_auth: bool,
    /// `mode=`: COLO, or output buffering as the baseline.
    pub mode: Mode,
    /// `miss_limit=`: heartbeat intervals without a word from the peer before it counts as lost
    /// (a dead peer or link is detected within `heartbeat_ms * miss_limit`).
    pub miss_limit: u32,
    /// `witness=`: the etcd that arbitrates takeovers (`IP:PORT`), or `None` (`witness=none`,
    /// the default): no automatic takeover, only `ctl failover` promotes.
    pub witness: Option<SocketAddrV4>,
    /// `cluster=`: the pair's name in the witness (`colo/<cluster>/...` keys).
    pub cluster: heapless::String<64>,
    /// `host_id=`: this host's id in the witness (default: its replication address as a number).
    pub host_id: Option<u64>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            role: Role::Standalone,
            guest_mem_bytes: 64 << 20,
            mgmt_addr: None,
            peer_addr: None,
            heartbeat_ms: 100,
            checkpoint_ms: 1000,
            log_level: log::LevelFilter::Info,
            on_idle: OnIdle::Exit,
            test_fault: None,
            mgmt_port: 7070,
            metrics_port: 9100,
            mgmt_gw: None,
            nics: heapless::Vec::from_slice(&[NicRoles::ALL]).unwrap_or_default(),
            repl_addr: None,
            repl_port: 7000,
            compare_timeout_ms: 100,
            checkpoint_verify: true,
            queue_limit: 4096,
            mgmt_open: MgmtOpen::Read,
            repl_auth: true,
            mode: Mode::Colo,
            miss_limit: 3,
            witness: None,
            cluster: heapless::String::try_from("colo").unwrap_or_default(),
            host_id: None,
        }
    }
}

/// One accepted key and the form of its value, as printed in error messages.
#[derive(Clone, Copy, Debug)]
pub struct KeySpec {
    /// The key, without `=`.
    pub key: &'static str,
    /// The accepted form of the value.
    pub form: &'static str,
}

/// Every key the command line accepts.
pub const KEYS: &[KeySpec] = &[
    KeySpec { key: "role", form: "primary|secondary|standalone" },
    KeySpec { key: "guest_mem", form: "a size from 2M to 4G, with suffix K, M or G (e.g. 64M)" },
    KeySpec { key: "mgmt_addr", form: "an IPv4 address with prefix length (e.g. 10.0.0.1/24)" },
    KeySpec { key: "peer_addr", form: "an IPv4 address and port (e.g. 10.0.1.2:7000)" },
    KeySpec { key: "heartbeat_ms", form: "milliseconds from 10 to 10000" },
    KeySpec { key: "checkpoint_ms", form: "milliseconds from 10 to 600000" },
    KeySpec { key: "log", form: "off|error|warn|info|debug|trace" },
    KeySpec { key: "on_idle", form: "exit|halt" },
    KeySpec { key: "test_fault", form: "breakpoint|invalid_opcode|page_fault|panic" },
    KeySpec { key: "mgmt_port", form: "a TCP port from 1 to 65535 (default 7070)" },
    KeySpec { key: "metrics_port", form: "a TCP port from 1 to 65535 (default 9100)" },
    KeySpec { key: "mgmt_gw", form: "an IPv4 address (e.g. 10.0.0.254)" },
    KeySpec {
        key: "nics",
        form: "up to 4 comma-separated NICs, each a +-joined set of mgmt, client, repl, every role on at \
               most one NIC (e.g. mgmt+client,repl; default mgmt+client+repl)",
    },
    KeySpec {
        key: "repl_addr",
        form: "an IPv4 address with prefix length on the replication network (e.g. 10.0.1.1/24)",
    },
    KeySpec { key: "repl_port", form: "a TCP port from 1 to 65535 (default 7000)" },
    KeySpec { key: "compare_timeout_ms", form: "milliseconds from 1 to 60000 (default 100)" },
    KeySpec { key: "checkpoint_verify", form: "on|off (default on)" },
    KeySpec { key: "queue_limit", form: "held frames from 1 to 1000000 (default 4096)" },
    KeySpec {
        key: "mgmt_open",
        form: "read|none (read: status, stats, tunables and /metrics need no token; none: every request needs the mgmt-token)",
    },
    KeySpec {
        key: "repl_auth",
        form: "on|off (default on: the replication link proves the cluster-key module and is encrypted; off only for benchmarks)",
    },
    KeySpec { key: "mode", form: "colo|buffer (default colo)" },
    KeySpec { key: "miss_limit", form: "heartbeat intervals from 1 to 1000 (default 3)" },
    KeySpec {
        key: "witness",
        form: "none|IP:PORT of the etcd witness (default none: no automatic takeover, only `ctl failover` promotes)",
    },
    KeySpec { key: "cluster", form: "a name of 1 to 64 characters A-Z a-z 0-9 . _ - (default colo)" },
    KeySpec { key: "host_id", form: "a number from 1 to 4294967295 (default: the repl_addr as a number)" },
];

/// The accepted form of `key`'s value.
fn form_of(key: &str) -> &'static str {
    KEYS.iter().find(|spec| spec.key == key).map_or("", |spec| spec.form)
}

/// Why a command line was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError<'a> {
    /// A key that is not in [`KEYS`].
    UnknownKey {
        /// The key as written.
        key: &'a str,
    },
    /// A word without `=`, or with nothing after it.
    MissingValue {
        /// The key as written.
        key: &'a str,
    },
    /// A value that does not have the key's accepted form.
    BadValue {
        /// The key.
        key: &'a str,
        /// The value as written.
        value: &'a str,
        /// The accepted form.
        expected: &'static str,
    },
    /// The same key given twice.
    Repeated {
        /// The key.
        key: &'a str,
    },
    /// A key the chosen role needs and the command line lacks.
    Required {
        /// The missing key.
        key: &'static str,
        /// The role that needs it.
        role: Role,
    },
    /// A replicating role without a NIC that carries the `repl` role alone (the replication link
    /// has an interface and address of its own).
    NeedsReplNic {
        /// The role.
        role: Role,
    },
}

impl fmt::Display for ConfigError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::UnknownKey { key } => {
                write!(f, "unknown key `{key}`; accepted keys:")?;
                for spec in KEYS {
                    write!(f, " {}", spec.key)?;
                }
                Ok(())
            }
            Self::MissingValue { key } => {
                write!(f, "key `{key}` has no value; accepted form: {key}={}", form_of(key))
            }
            Self::BadValue { key, value, expected } => {
                write!(f, "bad value `{value}` for key `{key}`; accepted form: {key}={expected}")
            }
            Self::Repeated { key } => write!(f, "key `{key}` is given more than once"),
            Self::Required { key, role } => {
                write!(f, "role={} requires key `{key}`; accepted form: {key}={}", role_name(*role), form_of(key))
            }
            Self::NeedsReplNic { role } => write!(
                f,
                "role={} needs a NIC with the repl role alone in key `nics`; accepted form: nics={}",
                role_name(*role),
                form_of("nics")
            ),
        }
    }
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Primary => "primary",
        Role::Secondary => "secondary",
        Role::Standalone => "standalone",
    }
}

/// Parses a kernel command line into a [`Config`].
pub fn parse(cmdline: &str) -> Result<Config, ConfigError<'_>> {
    let mut config = Config::default();
    let mut seen = [false; KEYS.len()];
    let mut words = cmdline.split_ascii_whitespace().peekable();
    if words.peek().is_some_and(|first| first.starts_with('/')) {
        words.next();
    }
    for word in words {
        let (key, value) = word.split_once('=').unwrap_or((word, ""));
        let index = KEYS.iter().position(|spec| spec.key == key).ok_or(ConfigError::UnknownKey { key })?;
        if value.is_empty() {
            return Err(ConfigError::MissingValue { key });
        }
        if core::mem::replace(&mut seen[index], true) {
            return Err(ConfigError::Repeated { key });
        }
        let bad = || ConfigError::BadValue { key, value, expected: KEYS[index].form };
        match key {
            "role" => {
                config.role = match value {
                    "primary" => Role::Primary,
                    "secondary" => Role::Secondary,
                    "standalone" => Role::Standalone,
                    _ => return Err(bad()),
                }
            }
            "guest_mem" => config.guest_mem_bytes = parse_size(value, 2 << 20, 4 << 30).ok_or_else(bad)?,
            "mgmt_addr" => config.mgmt_addr = Some(parse_cidr(value).ok_or_else(bad)?),
            "peer_addr" => config.peer_addr = Some(value.parse().map_err(|_| bad())?),
            "heartbeat_ms" => config.heartbeat_ms = parse_in_range(value, 10, 10_000).ok_or_else(bad)?,
            "checkpoint_ms" => config.checkpoint_ms = parse_in_range(value, 10, 600_000).ok_or_else(bad)?,
            "log" => config.log_level = value.parse().map_err(|_| bad())?,
            "on_idle" => {
                config.on_idle = match value {
                    "exit" => OnIdle::Exit,
                    "halt" => OnIdle::Halt,
                    _ => return Err(bad()),
                }
            }
            "test_fault" => {
                config.test_fault = Some(match value {
                    "breakpoint" => TestFault::Breakpoint,
                    "invalid_opcode" => TestFault::InvalidOpcode,
                    "page_fault" => TestFault::PageFault,
                    "panic" => TestFault::Panic,
                    _ => return Err(bad()),
                })
            }
            "mgmt_port" => config.mgmt_port = parse_in_range(value, 1, 65_535).ok_or_else(bad)? as u16,
            "metrics_port" => config.metrics_port = parse_in_range(value, 1, 65_535).ok_or_else(bad)? as u16,
            "mgmt_gw" => config.mgmt_gw = Some(value.parse().map_err(|_| bad())?),
            "nics" => config.nics = parse_nics(value).ok_or_else(bad)?,
            "repl_addr" => config.repl_addr = Some(parse_cidr(value).ok_or_else(bad)?),
            "repl_port" => config.repl_port = parse_in_range(value, 1, 65_535).ok_or_else(bad)? as u16,
            "compare_timeout_ms" => config.compare_timeout_ms = parse_in_range(value, 1, 60_000).ok_or_else(bad)?,
            "checkpoint_verify" => {
                config.checkpoint_verify = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(bad()),
                }
            }
            "queue_limit" => config.queue_limit = parse_in_range(value, 1, 1_000_000).ok_or_else(bad)?,
            "mgmt_open" => {
                config.mgmt_open = match value {
                    "read" => MgmtOpen::Read,
                    "none" => MgmtOpen::None,
                    _ => return Err(bad()),
                }
            }
            "repl_auth" => {
                config.repl_auth = match value {
                    "on" => true,
                    "off" => false,
                    _ => return Err(bad()),
                }
            }
            "mode" => {
                config.mode = match value {
                    "colo" => Mode::Colo,
                    "buffer" => Mode::Buffer,
                    _ => return Err(bad()),
                }
            }
            "miss_limit" => config.miss_limit = parse_in_range(value, 1, 1000).ok_or_else(bad)?,
            "witness" => {
                config.witness = match value {
                    "none" => None,
                    _ => Some(value.parse().map_err(|_| bad())?),
                }
            }
            "cluster" => {
                let ok = value.len() <= 64
                    && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
                config.cluster = heapless::String::try_from(value).ok().filter(|_| ok).ok_or_else(bad)?;
            }
            "host_id" => config.host_id = Some(u64::from(parse_in_range(value, 1, u32::MAX).ok_or_else(bad)?)),
            _ => unreachable!("every key in KEYS has a parser"),
        }
    }
    if matches!(config.role, Role::Primary | Role::Secondary) {
        if config.peer_addr.is_none() {
            return Err(ConfigError::Required { key: "peer_addr", role: config.role });
        }
        if config.repl_addr.is_none() {
            return Err(ConfigError::Required { key: "repl_addr", role: config.role });
        }
        if config.mgmt_addr.is_none() {
            return Err(ConfigError::Required { key: "mgmt_addr", role: config.role });
        }
        // The link has an interface of its own: its NIC carries no other role.
        if !config.nics.iter().any(|r| *r == NicRoles { repl: true, ..NicRoles::default() }) {
            return Err(ConfigError::NeedsReplNic { role: config.role });
        }
    }
    Ok(config)
}

/// A decimal number within `min..=max`. Leading `+`, signs and blanks are refused.
fn parse_in_range(value: &str, min: u32, max: u32) -> Option<u32> {
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok().filter(|n| (min..=max).contains(n))
}

/// A size such as `64M`, a multiple of 4 KiB, within `min..=max` bytes.
fn parse_size(value: &str, min: u64, max: u64) -> Option<u64> {
    let (digits, shift) = match value.as_bytes().last()? {
        b'K' | b'k' => (&value[..value.len() - 1], 10),
        b'M' | b'm' => (&value[..value.len() - 1], 20),
        b'G' | b'g' => (&value[..value.len() - 1], 30),
        _ => return None,
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let bytes = n.checked_shl(shift).filter(|b| b >> shift == n)?;
    (bytes % 4096 == 0 && (min..=max).contains(&bytes)).then_some(bytes)
}

/// `mgmt+client,repl`: NIC role groups; no empty group, no unknown or repeated role.
fn parse_nics(value: &str) -> Option<heapless::Vec<NicRoles, MAX_NICS>> {
    let mut nics = heapless::Vec::new();
    let mut seen = NicRoles::default();
    for group in value.split(',') {
        let mut roles = NicRoles::default();
        for role in group.split('+') {
            let (slot, taken) = match role {
                "mgmt" => (&mut roles.mgmt, &mut seen.mgmt),
                "client" => (&mut roles.client, &mut seen.client),
                "repl" => (&mut roles.repl, &mut seen.repl),
                _ => return None,
            };
            if core::mem::replace(taken, true) {
                return None;
            }
            *slot = true;
        }
        nics.push(roles).ok()?;
    }
    Some(nics)
}

fn parse_cidr(value: &str) -> Option<Ipv4Cidr> {
    let (addr, prefix) = value.split_once('/')?;
    let prefix = parse_in_range(prefix, 0, 32)?;
    Some(Ipv4Cidr { addr: addr.parse().ok()?, prefix: prefix as u8 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn empty_line_gives_defaults() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(parse("   ").unwrap(), Config::default());
    }

    #[test]
    fn witness_keys_parse_and_refuse_bad_values() {
        let config = parse("witness=10.78.1.5:2379 cluster=pair-1 host_id=7 miss_limit=5").unwrap();
        assert_eq!(config.witness, Some("10.78.1.5:2379".parse().unwrap()));
        assert_eq!(config.cluster.as_str(), "pair-1");
        assert_eq!(config.host_id, Some(7));
        assert_eq!(config.miss_limit, 5);
        let config = parse("witness=none").unwrap();
        assert_eq!(config.witness, None);
        assert_eq!(Config::default().witness, None, "witness=none is the default");
        for bad in ["witness=etcd", "witness=10.0.0.1", "cluster=a/b", "host_id=0", "miss_limit=0"] {
            assert!(matches!(parse(bad), Err(ConfigError::BadValue { .. })), "{bad} accepted");
        }
        let long = format!("cluster={}", "x".repeat(65));
        assert!(matches!(parse(&long), Err(ConfigError::BadValue { .. })));
    }

    #[test]
    fn leading_kernel_path_is_skipped() {
        let config = parse("/boot/colo-kernel role=standalone on_idle=halt").unwrap();
        assert_eq!(config.on_idle, OnIdle::Halt);
    }

    #[test]
    fn full_primary_line_parses() {
        let config = parse(
            "role=primary peer_addr=10.0.1.2:7000 mgmt_addr=10.0.0.1/24 guest_mem=128M \
             heartbeat_ms=50 checkpoint_ms=2000 log=debug test_fault=page_fault nics=mgmt+client,repl \
             repl_addr=10.0.1.1/24 repl_port=7100 compare_timeout_ms=5 checkpoint_verify=off queue_limit=8",
        )
        .unwrap();
        assert_eq!(config.role, Role::Primary);
        assert_eq!(config.peer_addr, Some("10.0.1.2:7000".parse().unwrap()));
        assert_eq!(config.mgmt_addr, Some(Ipv4Cidr { addr: Ipv4Addr::new(10, 0, 0, 1), prefix: 24 }));
        assert_eq!(config.guest_mem_bytes, 128 << 20);
        assert_eq!(config.heartbeat_ms, 50);
        assert_eq!(config.checkpoint_ms, 2000);
        assert_eq!(config.log_level, log::LevelFilter::Debug);
        assert_eq!(config.test_fault, Some(TestFault::PageFault));
        assert_eq!(config.repl_addr, Some(Ipv4Cidr { addr: Ipv4Addr::new(10, 0, 1, 1), prefix: 24 }));
        assert_eq!((config.repl_port, config.compare_timeout_ms, config.queue_limit), (7100, 5, 8));
        assert!(!config.checkpoint_verify);
        let defaults = Config::default();
        assert_eq!((defaults.repl_port, defaults.compare_timeout_ms, defaults.queue_limit), (7000, 100, 4096));
        assert!(defaults.checkpoint_verify);
    }

    #[test]
    fn mode_is_colo_or_buffer_and_anything_else_is_named() {
        assert_eq!(parse("role=standalone").unwrap().mode, Mode::Colo);
        assert_eq!(parse("mode=buffer").unwrap().mode, Mode::Buffer);
        assert_eq!(parse("mode=colo").unwrap().mode, Mode::Colo);
        assert_eq!(
            parse("mode=remus").unwrap_err(),
            ConfigError::BadValue { key: "mode", value: "remus", expected: "colo|buffer (default colo)" }
        );
    }

    #[test]
    fn replicating_roles_need_a_repl_address_a_mgmt_address_and_a_repl_nic() {
        let base = "role=primary peer_addr=10.0.1.2:7000";
        assert_eq!(parse(base).unwrap_err(), ConfigError::Required { key: "repl_addr", role: Role::Primary });
        let line = std::format!("{base} repl_addr=10.0.1.1/24");
        assert_eq!(parse(&line).unwrap_err(), ConfigError::Required { key: "mgmt_addr", role: Role::Primary });
        let line = std::format!("{base} repl_addr=10.0.1.1/24 mgmt_addr=10.0.0.1/24");
        let err = parse(&line).unwrap_err();
        assert_eq!(err, ConfigError::NeedsReplNic { role: Role::Primary });
        assert!(err.to_string().contains("repl role alone in key `nics`"), "{err}");
        assert!(parse(&std::format!("{line} nics=mgmt+client,repl")).is_ok());
        for bad in
            ["checkpoint_verify=yes", "compare_timeout_ms=0", "queue_limit=0", "repl_port=0", "repl_addr=10.0.1.1"]
        {
            assert!(matches!(parse(bad), Err(ConfigError::BadValue { .. })), "{bad}");
        }
    }

    #[test]
    fn unknown_key_is_named_with_the_accepted_keys() {
        let err = parse("role=standalone colour=blue").unwrap_err();
        assert_eq!(err, ConfigError::UnknownKey { key: "colour" });
        let msg = err.to_string();
        assert!(msg.contains("`colour`") && msg.contains("role") && msg.contains("peer_addr"), "{msg}");
    }

    #[test]
    fn bad_value_names_key_value_and_form() {
        let err = parse("role=tertiary").unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad value `tertiary` for key `role`; accepted form: role=primary|secondary|standalone"
        );
    }

    #[test]
    fn missing_value_and_bare_word_are_refused() {
        assert_eq!(parse("role=").unwrap_err(), ConfigError::MissingValue { key: "role" });
        assert_eq!(parse("role").unwrap_err(), ConfigError::MissingValue { key: "role" });
        assert!(parse("role").unwrap_err().to_string().contains("role=primary|secondary|standalone"));
    }

    #[test]
    fn repeated_key_is_refused() {
        assert_eq!(parse("log=info log=debug").unwrap_err(), ConfigError::Repeated { key: "log" });
    }

    #[test]
    fn replicating_roles_need_a_peer() {
        let err = parse("role=secondary").unwrap_err();
        assert_eq!(err, ConfigError::Required { key: "peer_addr", role: Role::Secondary });
        assert!(err.to_string().contains("role=secondary requires key `peer_addr`"));
    }

    #[test]
    fn numbers_outside_their_range_are_refused() {
        for line in [
            "heartbeat_ms=9",
            "heartbeat_ms=10001",
            "heartbeat_ms=-5",
            "heartbeat_ms=+5",
            "heartbeat_ms=5x",
            "heartbeat_ms=99999999999999999999",
            "checkpoint_ms=0",
        ] {
            assert!(matches!(parse(line), Err(ConfigError::BadValue { .. })), "{line}");
        }
    }

    #[test]
    fn sizes_need_suffix_alignment_and_range() {
        assert_eq!(parse("guest_mem=2M").unwrap().guest_mem_bytes, 2 << 20);
        assert_eq!(parse("guest_mem=4G").unwrap().guest_mem_bytes, 4 << 30);
        assert_eq!(parse("guest_mem=8192k").unwrap().guest_mem_bytes, 8 << 20);
        for bad in ["64", "1M", "5G", "M", "4097K", "18446744073709551615G", "1.5G"] {
            let line = std::format!("guest_mem={bad}");
            assert!(matches!(parse(&line), Err(ConfigError::BadValue { .. })), "{line}");
        }
    }

    #[test]
    fn network_keys_parse() {
        let config =
            parse("mgmt_addr=10.77.0.2/24 mgmt_port=7000 metrics_port=9000 mgmt_gw=10.77.0.1 nics=mgmt+client,repl")
                .unwrap();
        assert_eq!((config.mgmt_port, config.metrics_port), (7000, 9000));
        assert_eq!(config.mgmt_gw, Some(Ipv4Addr::new(10, 77, 0, 1)));
        let mgmt_client = NicRoles { mgmt: true, client: true, repl: false };
        let repl = NicRoles { repl: true, ..NicRoles::default() };
        assert_eq!(config.nics.as_slice(), &[mgmt_client, repl]);
        assert_eq!(mgmt_client.to_string(), "mgmt+client");
        let defaults = Config::default();
        assert_eq!((defaults.mgmt_port, defaults.metrics_port, defaults.mgmt_gw), (7070, 9100, None));
        assert_eq!(defaults.nics.as_slice(), &[NicRoles::ALL]);
        assert_eq!(parse("nics=repl,client,mgmt").unwrap().nics.len(), 3);
    }

    #[test]
    fn bad_network_values_are_refused() {
        for bad in [
            "mgmt_port=0",
            "mgmt_port=65536",
            "metrics_port=http",
            "mgmt_gw=10.77.0",
            "mgmt_gw=10.77.0.1/24",
            "nics=mgmt,mgmt",
            "nics=mgmt+mgmt",
            "nics=mgmt,,repl",
            "nics=mgmt+",
            "nics=storage",
            "nics=mgmt,client,repl,mgmt",
        ] {
            let err = parse(bad).unwrap_err();
            assert!(matches!(err, ConfigError::BadValue { .. }), "{bad}");
            assert!(err.to_string().contains("accepted form"), "{bad}: {err}");
        }
    }

    #[test]
    fn repl_auth_is_on_unless_turned_off() {
        assert!(Config::default().repl_auth);
        assert!(!parse("repl_auth=off").unwrap().repl_auth);
        assert!(parse("repl_auth=on").unwrap().repl_auth);
        let err = parse("repl_auth=no").unwrap_err().to_string();
        assert!(err.contains("`repl_auth`") && err.contains("on|off"), "{err}");
    }

    #[test]
    fn mgmt_open_is_read_or_none() {
        assert_eq!(Config::default().mgmt_open, MgmtOpen::Read);
        assert_eq!(parse("mgmt_open=none").unwrap().mgmt_open, MgmtOpen::None);
        assert_eq!(parse("mgmt_open=read").unwrap().mgmt_open, MgmtOpen::Read);
        let err = parse("mgmt_open=all").unwrap_err();
        assert_eq!(
            err.to_string(),
            "bad value `all` for key `mgmt_open`; accepted form: mgmt_open=read|none (read: status, stats, tunables and /metrics need no token; none: every request needs the mgmt-token)"
        );
    }

    #[test]
    fn addresses_are_checked() {
        for bad in ["mgmt_addr=10.0.0.1", "mgmt_addr=10.0.0.1/33", "mgmt_addr=10.0.0/24", "peer_addr=10.0.0.1"] {
            assert!(matches!(parse(bad), Err(ConfigError::BadValue { .. })), "{bad}");
        }
    }
}
