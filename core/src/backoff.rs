//! Capped exponential backoff, with jitter, for retrying a peer that failed.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Delays between retries: doubling from `initial` up to `max`, reset by a success. Each delay
/// after the first is shortened by a random part of up to a quarter (never below `initial`), so
/// that links which failed together (a peer restarting) do not retry in step.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
    /// State of the xorshift generator that draws the jitter (never 0).
    random: u64,
}

impl Backoff {
    /// A backoff that waits `initial` after the first failure and never more than `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        // A per-process random seed (std's hasher keys), different for each backoff.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(0);
        Self::with_seed(initial, max, hasher.finish())
    }

    /// [`Backoff::new`] with a given seed for the jitter.
    pub fn with_seed(initial: Duration, max: Duration, seed: u64) -> Self {
        Backoff { initial, max: max.max(initial), failures: 0, random: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1 }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*
        let mut x = self.random;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.random = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn fail(&mut self) -> Duration {
        let shift = self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        let full = self.initial.saturating_mul(1u32 << shift).min(self.max);
        let spread = u64::try_from(full.saturating_sub(self.initial).min(full / 4).as_nanos()).unwrap_or(u64::MAX);
        if spread == 0 {
            return full;
        }
        full - Duration::from_nanos(self.next_random() % spread.saturating_add(1))
    }

    /// Records a success: the next failure waits `initial` again.
    pub fn succeed(&mut self) {
        self.failures = 0;
    }

    /// How many failures in a row have been recorded.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Changes the bounds (after a configuration reload), keeping the failure count.
    pub fn set_bounds(&mut self, initial: Duration, max: Duration) {
        self.initial = initial;
        self.max = max.max(initial);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether `d` is the doubled delay `full`, shortened by at most a quarter, not below 100 ms.
    fn within(d: Duration, full: Duration) -> bool {
        d <= full && d >= (full - full / 4).max(Duration::from_millis(100))
    }

    #[test]
    fn doubles_up_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.fail(), Duration::from_millis(100));
        for full in [200, 400, 800, 1000] {
            let d = b.fail();
            assert!(within(d, Duration::from_millis(full)), "{d:?} for {full} ms");
        }
        for _ in 0..100 {
            let d = b.fail();
            assert!(within(d, Duration::from_secs(1)), "{d:?} at the cap");
        }
        b.succeed();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.fail(), Duration::from_millis(100));
    }

    #[test]
    fn links_failing_together_retry_apart() {
        let (initial, max) = (Duration::from_millis(500), Duration::from_secs(30));
        let delays: std::collections::BTreeSet<Duration> = (0..20)
            .map(|seed| {
                let mut b = Backoff::with_seed(initial, max, seed);
                (0..8).map(|_| b.fail()).last().unwrap()
            })
            .collect();
        assert!(delays.len() > 10, "20 links at the cap retry at {} distinct times", delays.len());
        let mut b = Backoff::new(initial, max);
        let mut c = Backoff::new(initial, max);
        let apart = (0..10).map(|_| (b.fail(), c.fail())).filter(|(x, y)| x != y).count();
        assert!(apart >= 8, "two new backoffs drew the same delays");
    }

    #[test]
    fn equal_bounds_have_no_jitter() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
        for _ in 0..10 {
            assert_eq!(b.fail(), Duration::from_secs(1));
        }
    }
}
