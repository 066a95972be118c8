//! Time for the whole COLO engine: one [`Tick`] type, passed in with every event.
//!
//! The engine never reads a clock. The caller counts ticks of whatever timer it uses (the APIC
//! timer on bare metal, a virtual clock in host tests) and hands the current tick to every
//! push, poll and event. Durations (timeouts, intervals) are plain `u64` tick counts.
#![deny(unsafe_code)]

/// A point in time, in ticks of the caller's timer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct Tick(pub u64);

impl Tick {
    /// Ticks from `earlier` to `self` (0 if `earlier` is later).
    pub fn since(self, earlier: Tick) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The tick `ticks` after this one (saturating).
    pub fn after(self, ticks: u64) -> Tick {
        Tick(self.0.saturating_add(ticks))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_and_after_saturate() {
        assert_eq!(Tick(10).since(Tick(4)), 6);
        assert_eq!(Tick(4).since(Tick(10)), 0);
        assert_eq!(Tick(u64::MAX - 1).after(5), Tick(u64::MAX));
        assert_eq!(Tick(3).after(4), Tick(7));
    }
}
