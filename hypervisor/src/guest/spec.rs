//! A guest module line parsed into a typed [`GuestSpec`]: `guest-NAME key=value ...`.
//!
//! Only the keys the hypervisor acts on are parsed here ([`KEYS`]); every other word is the
//! guest's own (it reads its command line itself). A known key with a bad value is an error that
//! names the key, the value and the accepted form: the runner ends that guest with the message
//! and the hypervisor goes on with the next module. Nothing falls back to a default silently.
#![deny(unsafe_code)]

use core::fmt;

use crate::vcpu::DirtyLogMethod;

/// How long a guest may run unless its module line says `time_limit_ms=N`.
pub const DEFAULT_TIME_LIMIT_MS: u64 = 30_000;

/// A self-test scenario named by `scenario=` (run by `selftest`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scenario {
    /// Exact dirty-page count between test marks 1 and 2.
    DirtyCount,
    /// Snapshot mid-computation, restore into a second guest and the same guest, compare output.
    SnapshotRestore,
    /// Time the PVM pause for the pages dirtied between the marks.
    SnapshotBench,
    /// Snapshot a serving guest (NIC attached) and go on in a fresh guest restored from it.
    SnapshotServe,
    /// PVM and SVM on one host: a full sync, the SVM diverges, a dirty-page checkpoint makes the
    /// SVM equal the PVM again (its own dirty pages included).
    CheckpointPair,
}

impl Scenario {
    const ALL: [(&'static str, Scenario); 5] = [
        ("dirty-count", Self::DirtyCount),
        ("snapshot-restore", Self::SnapshotRestore),
        ("snapshot-bench", Self::SnapshotBench),
        ("snapshot-serve", Self::SnapshotServe),
        ("checkpoint-pair", Self::CheckpointPair),
    ];

    /// Its name on the module line.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(_, s)| *s == self).map_or("?", |(n, _)| n)
    }
}

/// One accepted key: its name and the form its value must have.
#[derive(Clone, Copy, Debug)]
pub struct Key {
    /// The key.
    pub name: &'static str,
    /// What a value must look like.
    pub accepted: &'static str,
}

/// Every key the hypervisor reads from a guest module line.
pub const KEYS: &[Key] = &[
    Key { name: "time_limit_ms", accepted: "a whole number of milliseconds from 1 to 86400000" },
    Key { name: "time_slice_us", accepted: "a whole number of microseconds from 10 to 1000000" },
    Key { name: "mac", accepted: "a unicast MAC address aa:bb:cc:dd:ee:ff (hex octets)" },
    Key { name: "disk", accepted: "a disk module name (1 to 32 of A-Z a-z 0-9 _ -), for module disk-NAME" },
    Key { name: "restarts", accepted: "a whole number from 0 to 100" },
    Key { name: "scenario", accepted: "dirty-count|snapshot-restore|snapshot-bench|snapshot-serve|checkpoint-pair" },
    Key { name: "dirty_log", accepted: "pml|ad|wp" },
    Key { name: "snapshot_after_lines", accepted: "a whole number of console lines from 1 to 1000000" },
    Key { name: "snapshot_after_writes", accepted: "a whole number of disk writes from 1 to 1000000" },
];

/// Why a guest module line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecError<'a> {
    /// A known key with a value outside its accepted form.
    BadValue {
        /// The key.
        key: &'static str,
        /// The value found.
        value: &'a str,
        /// The accepted form.
        accepted: &'static str,
    },
    /// A known key given more than once.
    Repeated {
        /// The key.
        key: &'static str,
    },
    /// The line does not start with a guest name `guest-NAME`.
    NotAGuest {
        /// The first word.
        name: &'a str,
    },
}

impl fmt::Display for SpecError<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadValue { key, value, accepted } => {
                write!(f, "bad module argument `{key}={value}`: expected {accepted}")
            }
            Self::Repeated { key } => write!(f, "module argument `{key}` given twice; expected it at most once"),
            Self::NotAGuest { name } => write!(f, "module `{name}` is not a guest; expected a name guest-NAME"),
        }
    }
}

/// A guest module line, typed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSpec<'a> {
    /// The guest's name (the first word, `guest-NAME`).
    pub name: &'a str,
    /// The whole module line (the guest reads its own keys from it).
    pub cmdline: &'a str,
    /// `time_limit_ms=`: how long the guest may run.
    pub time_limit_ms: u64,
    /// `time_slice_us=`: the preemption time slice, when not the runner's default.
    pub time_slice_us: Option<u64>,
    /// `mac=`: the paravirtual NIC's address (no NIC without it).
    pub mac: Option<[u8; 6]>,
    /// `disk=NAME`: the block device over module `disk-NAME`.
    pub disk: Option<&'a str>,
    /// `restarts=N`: run the same module N more times after it ends (same disk).
    pub restarts: u32,
    /// `scenario=`: a self-test scenario instead of a plain run.
    pub scenario: Option<Scenario>,
    /// `dirty_log=`: the dirty-tracking method of a scenario (default PML).
    pub dirty_log: DirtyLogMethod,
    /// `snapshot_after_lines=K`: snapshot-restore (and checkpoint-pair's full sync) snapshots at
    /// the first preemption-timer exit after the guest printed K console lines.
    pub snapshot_after_lines: Option<u64>,
    /// `snapshot_after_writes=N`: snapshot-serve snapshots once the guest's disk took N writes.
    pub snapshot_after_writes: Option<u64>,
}

/// The module name prefix of guests.
pub const GUEST_PREFIX: &str = "guest-";

fn number<'a>(key: &'static str, value: &'a str, range: core::ops::RangeInclusive<u64>) -> Result<u64, SpecError<'a>> {
    let accepted = KEYS.iter().find(|k| k.name == key).map_or("?", |k| k.accepted);
    let bad = SpecError::BadValue { key, value, accepted };
    if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad);
    }
    value.parse::<u64>().ok().filter(|v| range.contains(v)).ok_or(bad)
}

impl<'a> GuestSpec<'a> {
    /// Parses a guest module line.
    pub fn parse(cmdline: &'a str) -> Result<Self, SpecError<'a>> {
        let mut words = cmdline.split_ascii_whitespace();
        let name = words.next().unwrap_or("");
        if !name.starts_with(GUEST_PREFIX) {
            return Err(SpecError::NotAGuest { name });
        }
        let mut spec = Self {
            name,
            cmdline,
            time_limit_ms: DEFAULT_TIME_LIMIT_MS,
            time_slice_us: None,
            mac: None,
            disk: None,
            restarts: 0,
            scenario: None,
            dirty_log: DirtyLogMethod::Pml,
            snapshot_after_lines: None,
            snapshot_after_writes: None,
        };
        let mut seen = [false; KEYS.len()];
        for word in words {
            let Some((key, value)) = word.split_once('=') else { continue };
            let Some(index) = KEYS.iter().position(|k| k.name == key) else { continue };
            let key = KEYS[index].name;
            if core::mem::replace(&mut seen[index], true) {
                return Err(SpecError::Repeated { key });
            }
            let bad = SpecError::BadValue { key, value, accepted: KEYS[index].accepted };
            match key {
                "time_limit_ms" => spec.time_limit_ms = number(key, value, 1..=86_400_000)?,
                "time_slice_us" => spec.time_slice_us = Some(number(key, value, 10..=1_000_000)?),
                "mac" => spec.mac = Some(crate::devices::parse_mac(value).ok_or(bad)?),
                "disk" => {
                    let ok = (1..=32).contains(&value.len())
                        && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    spec.disk = Some(value).filter(|_| ok);
                    spec.disk.ok_or(bad)?;
                }
                "restarts" => spec.restarts = number(key, value, 0..=100)? as u32,
                "scenario" => {
                    spec.scenario = Some(Scenario::ALL.iter().find(|(n, _)| *n == value).ok_or(bad)?.1);
                }
                "dirty_log" => {
                    spec.dirty_log = match value {
                        "pml" => DirtyLogMethod::Pml,
                        "ad" => DirtyLogMethod::AccessedDirty,
                        "wp" => DirtyLogMethod::WriteProtect,
                        _ => return Err(bad),
                    }
                }
                "snapshot_after_lines" => spec.snapshot_after_lines = Some(number(key, value, 1..=1_000_000)?),
                "snapshot_after_writes" => spec.snapshot_after_writes = Some(number(key, value, 1..=1_000_000)?),
                _ => {}
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::string::ToString;

    #[test]
    fn defaults_and_values_parse() {
        let s = GuestSpec::parse("guest-hello status=3").unwrap();
        assert_eq!(
            (s.name, s.time_limit_ms, s.time_slice_us, s.mac, s.disk, s.restarts),
            ("guest-hello", 30_000, None, None, None, 0)
        );
        assert_eq!((s.scenario, s.dirty_log), (None, DirtyLogMethod::Pml));
        let s = GuestSpec::parse(
            "guest-redis ip=10.77.1.3/24 mac=52:54:00:c0:01:03 disk=data restarts=1 time_limit_ms=600000 \
             time_slice_us=200 scenario=snapshot-serve dirty_log=ad snapshot_after_lines=11 snapshot_after_writes=4 flag",
        )
        .unwrap();
        assert_eq!(s.mac, Some([0x52, 0x54, 0, 0xC0, 1, 3]));
        assert_eq!((s.disk, s.restarts, s.time_limit_ms, s.time_slice_us), (Some("data"), 1, 600_000, Some(200)));
        assert_eq!((s.scenario, s.dirty_log), (Some(Scenario::SnapshotServe), DirtyLogMethod::AccessedDirty));
        assert_eq!((s.snapshot_after_lines, s.snapshot_after_writes), (Some(11), Some(4)));
        assert_eq!(Scenario::SnapshotServe.name(), "snapshot-serve");
        assert_eq!(
            GuestSpec::parse("guest-c scenario=checkpoint-pair").unwrap().scenario,
            Some(Scenario::CheckpointPair)
        );
    }

    #[test]
    fn bad_values_are_named_with_the_accepted_form() {
        let cases = [
            ("guest-a time_limit_ms=abc", "time_limit_ms", "abc"),
            ("guest-a time_limit_ms=0", "time_limit_ms", "0"),
            ("guest-a time_limit_ms=", "time_limit_ms", ""),
            ("guest-a time_limit_ms=-5", "time_limit_ms", "-5"),
            ("guest-a time_limit_ms=99999999999999999999999", "time_limit_ms", "99999999999999999999999"),
            ("guest-a time_slice_us=5", "time_slice_us", "5"),
            ("guest-a mac=01:00:5e:00:00:01", "mac", "01:00:5e:00:00:01"),
            ("guest-a mac=52:54:00", "mac", "52:54:00"),
            ("guest-a disk=a/b", "disk", "a/b"),
            ("guest-a disk=", "disk", ""),
            ("guest-a restarts=101", "restarts", "101"),
            ("guest-a scenario=reboot", "scenario", "reboot"),
            ("guest-a dirty_log=both", "dirty_log", "both"),
            ("guest-a snapshot_after_lines=0", "snapshot_after_lines", "0"),
            ("guest-a snapshot_after_writes=x", "snapshot_after_writes", "x"),
        ];
        for (line, key, value) in cases {
            match GuestSpec::parse(line) {
                Err(e @ SpecError::BadValue { key: k, value: v, accepted }) => {
                    assert_eq!((k, v), (key, value), "{line}");
                    let text = e.to_string();
                    assert!(text.contains(&std::format!("`{key}={value}`")) && text.contains(accepted), "{text}");
                }
                other => panic!("{line}: {other:?}"),
            }
        }
    }

    #[test]
    fn repeated_keys_and_non_guests_are_refused() {
        assert_eq!(
            GuestSpec::parse("guest-a mac=52:54:00:c0:01:03 mac=52:54:00:c0:01:04"),
            Err(SpecError::Repeated { key: "mac" })
        );
        assert_eq!(GuestSpec::parse("disk-data"), Err(SpecError::NotAGuest { name: "disk-data" }));
        assert!(GuestSpec::parse("").is_err());
    }
}
