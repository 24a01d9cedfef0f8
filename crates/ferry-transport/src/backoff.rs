//! Reconnect and retry delays: exponential, capped, with seeded jitter.

use ferry_core::{RandomSource, SeededRandom};

/// Exponential backoff with "equal jitter": the n-th delay is drawn from
/// `[d/2, d]` where `d = min(max_delay_ms, initial_delay_ms * 2^n)`.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial_delay_ms: u64,
    max_delay_ms: u64,
    attempt: u32,
    rng: SeededRandom,
}

impl Backoff {
    /// A policy starting at `initial_delay_ms`, capped at `max_delay_ms`,
    /// its jitter drawn from `seed`.
    pub fn new(initial_delay_ms: u64, max_delay_ms: u64, seed: u64) -> Self {
        Backoff {
            initial_delay_ms: initial_delay_ms.max(1),
            max_delay_ms: max_delay_ms.max(initial_delay_ms.max(1)),
            attempt: 0,
            rng: SeededRandom::new(seed),
        }
    }

    /// The delay before the next attempt.
    pub fn next_delay_ms(&mut self) -> u64 {
        let exp = self
            .initial_delay_ms
            .saturating_mul(1u64.checked_shl(self.attempt.min(62)).unwrap_or(u64::MAX));
        let d = exp.min(self.max_delay_ms);
        self.attempt = self.attempt.saturating_add(1);
        d / 2 + self.rng.below(d - d / 2 + 1)
    }

    /// Attempts made since the last success.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    /// Start over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_within_jitter_and_caps() {
        let mut b = Backoff::new(100, 5_000, 7);
        let bounds = [
            (50, 100),
            (100, 200),
            (200, 400),
            (400, 800),
            (800, 1600),
            (1600, 3200),
            (2500, 5000),
            (2500, 5000),
        ];
        for (lo, hi) in bounds {
            let d = b.next_delay_ms();
            assert!((lo..=hi).contains(&d), "{d} not in {lo}..={hi}");
        }
        b.reset();
        assert!(b.next_delay_ms() <= 100);
        let mut same = Backoff::new(100, 5_000, 7);
        let mut again = Backoff::new(100, 5_000, 7);
        for _ in 0..10 {
            assert_eq!(same.next_delay_ms(), again.next_delay_ms());
        }
    }
}
