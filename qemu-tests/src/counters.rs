//! The COLO engine's counters as the benchmarks and the demo read them.
//!
//! Today they come from the line each host's driver prints on its serial console for every
//! committed epoch (`node: epoch N committed; checkpoints [..] ...`). When the engine's counters
//! reach `ctl status`, only [`read`] changes: everything else takes an [`EngineCounters`].

use crate::cluster::{Cluster, Host};

/// Checkpoint causes in the engine's counter order (`colo::node::Cause::ALL`).
pub const CAUSES: [&str; 6] = ["mismatch", "timeout", "pressure", "periodic", "manual", "full_sync"];

/// One committed epoch, as its log line reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Commit {
    /// The epoch committed.
    pub epoch: u64,
    /// Checkpoints started so far, by cause ([`CAUSES`]).
    pub by_cause: [u64; 6],
    /// Checkpoints committed so far.
    pub committed: u64,
    /// Checkpoints aborted so far.
    pub aborted: u64,
    /// Verify failures so far.
    pub verify_failures: u64,
    /// Link errors so far.
    pub link_errors: u64,
    /// PVM pause of this checkpoint, µs.
    pub pause_us: u64,
    /// Dirty pages of this checkpoint.
    pub pages: u64,
    /// Stream bytes of this checkpoint.
    pub bytes: u64,
    /// Totals so far, µs (pause and transfer on the primary, apply on the secondary); `None` in
    /// lines from drivers that do not print them.
    pub totals_us: Option<(u64, u64, u64)>,
}

/// What a host's counters say at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EngineCounters {
    /// The last commit reported.
    pub last: Commit,
    /// Every commit line so far, oldest first.
    pub commits: Vec<Commit>,
}

impl EngineCounters {
    /// Divergence checkpoints (mismatch and held-frame timeout) so far.
    pub fn divergence(&self) -> u64 {
        self.last.by_cause[0] + self.last.by_cause[1]
    }
}

fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let digits: String = rest.trim_start().chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// Parses one commit line; `None` for any other line.
pub fn parse_commit_line(line: &str) -> Option<Commit> {
    let at = line.find("node: epoch ")?;
    let line = &line[at..];
    if !line.contains(" committed; checkpoints [") {
        return None;
    }
    let causes = &line[line.find('[')? + 1..line.find(']')?];
    let mut by_cause = [0u64; 6];
    let mut n = 0;
    for (slot, v) in by_cause.iter_mut().zip(causes.split(',')) {
        *slot = v.trim().parse().ok()?;
        n += 1;
    }
    if n != 6 {
        return None;
    }
    let after_causes = &line[line.find(']')?..];
    let totals = line.find("totals pause ").and_then(|i| {
        let t = &line[i..];
        Some((number_after(t, "totals pause ")?, number_after(t, "transfer ")?, number_after(t, "apply ")?))
    });
    Some(Commit {
        epoch: number_after(line, "node: epoch ")?,
        by_cause,
        committed: number_after(after_causes, "committed ")?,
        aborted: number_after(after_causes, "aborted ")?,
        verify_failures: number_after(after_causes, "verify failures ")?,
        link_errors: number_after(after_causes, "link errors ")?,
        pause_us: number_after(after_causes, "; pause ")?,
        pages: number_after(after_causes, " us, ")?,
        bytes: number_after(after_causes, " pages, ")?,
        totals_us: totals,
    })
}

/// The counters in a serial console's text (the last commit line and all of them). A last line
/// without its newline is still being written and is left out.
pub fn from_serial(serial: &str) -> Option<EngineCounters> {
    let complete = &serial[..serial.rfind('\n').map_or(0, |i| i + 1)];
    let commits: Vec<Commit> = complete.lines().filter_map(parse_commit_line).collect();
    Some(EngineCounters { last: commits.last()?.clone(), commits })
}

/// `host`'s engine counters now. The one place that decides where they come from (the serial
/// log today; `ctl status` once the engine is in the management API).
pub fn read(cluster: &Cluster, host: Host) -> Option<EngineCounters> {
    from_serial(&cluster.serial(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "[INFO  hypervisor::node] node: epoch 204 committed; checkpoints [3, 1, 0, 17, 2, 1] committed 204 aborted 0; verify failures 0; link errors 0; pause 812 us, 301 pages, 1234567 bytes; mirrored 0 (input dropped 0) svm 819 (dropped 0); pvm 0 released 0 (by checkpoint 0) compared 0 B, svm discarded 0; totals pause 9000 us, transfer 45000 us, apply 7000 us; digest 204:48bbae1a-32e60bdb";

    #[test]
    fn a_commit_line_parses_field_by_field() {
        let c = parse_commit_line(LINE).unwrap();
        assert_eq!(c.epoch, 204);
        assert_eq!(c.by_cause, [3, 1, 0, 17, 2, 1]);
        assert_eq!((c.committed, c.aborted, c.verify_failures, c.link_errors), (204, 0, 0, 0));
        assert_eq!((c.pause_us, c.pages, c.bytes), (812, 301, 1_234_567));
        assert_eq!(c.totals_us, Some((9000, 45000, 7000)));
    }

    #[test]
    fn older_lines_without_totals_and_other_lines() {
        let old = LINE.replace("; totals pause 9000 us, transfer 45000 us, apply 7000 us", "");
        assert_eq!(parse_commit_line(&old).unwrap().totals_us, None);
        assert!(parse_commit_line("node: COLO running (Primary, epoch 2)").is_none());
        assert!(parse_commit_line("node: epoch 3 committed; checkpoints [1, 2] committed 3").is_none());
        let serial = format!("boot\n{LINE}\nnode: link Down\n{}\n", LINE.replace("epoch 204", "epoch 205"));
        let counters = from_serial(&serial).unwrap();
        assert_eq!(counters.commits.len(), 2);
        assert_eq!(counters.last.epoch, 205);
        assert_eq!(counters.divergence(), 4);
        assert!(from_serial("nothing").is_none());
        // A line still being written does not count.
        let partial = format!("{LINE}\n{}", &LINE[..LINE.len() - 80].replace("epoch 204", "epoch 205"));
        let counters = from_serial(&partial).unwrap();
        assert_eq!((counters.commits.len(), counters.last.epoch), (1, 204));
        assert!(counters.last.totals_us.is_some());
    }
}
