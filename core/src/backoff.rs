//! Capped exponential backoff for retrying a peer that failed.

use std::time::Duration;

/// Delays between retries: doubling from `initial` up to `max`, reset by a success.
#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// A backoff that waits `initial` after the first failure and never more than `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff { initial, max: max.max(initial), failures: 0 }
    }

    /// Records a failure and returns how long to wait before the next attempt.
    pub fn fail(&mut self) -> Duration {
        let shift = self.failures.min(20);
        self.failures = self.failures.saturating_add(1);
        self.initial.saturating_mul(1u32 << shift).min(self.max)
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

    #[test]
    fn doubles_up_to_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.fail(), Duration::from_millis(100));
        assert_eq!(b.fail(), Duration::from_millis(200));
        assert_eq!(b.fail(), Duration::from_millis(400));
        assert_eq!(b.fail(), Duration::from_millis(800));
        assert_eq!(b.fail(), Duration::from_secs(1));
        for _ in 0..100 {
            assert_eq!(b.fail(), Duration::from_secs(1));
        }
        b.succeed();
        assert_eq!(b.failures(), 0);
        assert_eq!(b.fail(), Duration::from_millis(100));
    }
}
