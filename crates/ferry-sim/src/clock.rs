//! Simulated time: every clock of the fleet reads tokio's paused clock, so
//! time moves only when the whole fleet is idle, by exactly as much as the
//! next timer needs, the same way on every run.

use ferry_core::Clock;

/// Wall time of the simulation's start (ms since the epoch): fixed, so
/// runs are identical.
pub const EPOCH_MS: u64 = 1_700_000_000_000;

/// A device's or the server's wall clock: the simulation's time plus a
/// fixed skew.
#[derive(Debug, Clone)]
pub struct SimClock {
    start: tokio::time::Instant,
    offset_ms: i64,
}

impl SimClock {
    /// A clock `offset_ms` off the simulation's time, started at `start`.
    pub fn new(start: tokio::time::Instant, offset_ms: i64) -> Self {
        SimClock { start, offset_ms }
    }
}

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        let elapsed_ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        EPOCH_MS
            .saturating_add(elapsed_ms)
            .saturating_add_signed(self.offset_ms)
    }
}
