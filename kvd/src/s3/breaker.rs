//! The S3 tier's circuit breaker: when S3 keeps failing, stop asking it for a while.
//!
//! Without it every lookup that reaches the S3 tier would wait out its retries and timeouts
//! against a dead endpoint, and the engine's time to first token would follow S3's outage.
//! After `failures` consecutive failed requests the breaker opens: reads become misses at
//! once and uploads wait, without a request. After `open_for` one request is let through as a
//! probe (half-open); its success closes the breaker, its failure opens it again. Pure logic
//! over a caller-supplied clock, so the transitions are tested without sleeping.

use std::time::{Duration, Instant};

/// What the breaker says about S3 right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Requests go through.
    Closed,
    /// Requests are refused until the probe time.
    Open,
    /// One probe request is in flight; others are refused.
    HalfOpen,
}

/// Consecutive-failure circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    failures: u32,
    threshold: u32,
    open_for: Duration,
    open_until: Option<Instant>,
    probing: bool,
    /// Times the breaker opened.
    pub opened: u64,
}

impl Breaker {
    /// Opens after `threshold` consecutive failures, for `open_for`.
    pub fn new(threshold: u32, open_for: Duration) -> Self {
        Self {
            failures: 0,
            threshold: threshold.max(1),
            open_for,
            open_until: None,
            probing: false,
            opened: 0,
        }
    }

    /// The state at `now`.
    pub fn state(&self, now: Instant) -> BreakerState {
        match self.open_until {
            None => BreakerState::Closed,
            Some(t) if now < t => BreakerState::Open,
            Some(_) if self.probing => BreakerState::HalfOpen,
            // Probe time reached, no probe yet: the next `allow` starts one.
            Some(_) => BreakerState::HalfOpen,
        }
    }

    /// Whether a request may go to S3 now: `None` if not, `Some(true)` if it is the
    /// half-open probe, which must report its outcome ([`success`](Self::success),
    /// [`failure`](Self::failure), or [`abandon`](Self::abandon) when it is cancelled).
    pub fn allow(&mut self, now: Instant) -> Option<bool> {
        match self.open_until {
            None => Some(false),
            Some(t) if now < t => None,
            Some(_) if self.probing => None,
            Some(_) => {
                self.probing = true;
                Some(true)
            }
        }
    }

    /// A request succeeded: the breaker closes.
    pub fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
        self.probing = false;
    }

    /// A request failed (after its retries).
    pub fn failure(&mut self, now: Instant) {
        self.failures = self.failures.saturating_add(1);
        if self.probing || (self.open_until.is_none() && self.failures >= self.threshold) {
            if self.open_until.is_none() || self.probing {
                self.opened += 1;
            }
            self.open_until = Some(now + self.open_for);
            self.probing = false;
        }
    }

    /// A request ended without telling anything about S3's health (cancelled): a probe may
    /// be tried again.
    pub fn abandon(&mut self) {
        self.probing = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_consecutive_failures_and_probes_after_the_pause() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, Duration::from_secs(10));
        assert_eq!(b.allow(t0), Some(false));
        b.failure(t0);
        b.failure(t0);
        b.success();
        b.failure(t0);
        b.failure(t0);
        assert_eq!(
            b.state(t0),
            BreakerState::Closed,
            "a success resets the count"
        );
        b.failure(t0);
        assert_eq!(b.state(t0), BreakerState::Open);
        assert_eq!(b.opened, 1);
        assert_eq!(b.allow(t0 + Duration::from_secs(9)), None);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(b.allow(later), Some(true), "the probe");
        assert_eq!(b.allow(later), None, "one probe at a time");
        assert_eq!(b.state(later), BreakerState::HalfOpen);
        b.failure(later);
        assert_eq!(b.state(later), BreakerState::Open, "a failed probe reopens");
        assert_eq!(b.opened, 2);
        let again = later + Duration::from_secs(10);
        assert_eq!(b.allow(again), Some(true));
        b.success();
        assert_eq!(b.state(again), BreakerState::Closed);
        assert_eq!((b.allow(again), b.allow(again)), (Some(false), Some(false)));
    }

    #[test]
    fn an_abandoned_probe_lets_another_try() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, Duration::from_millis(1));
        b.failure(t0);
        let t1 = t0 + Duration::from_millis(2);
        assert_eq!(b.allow(t1), Some(true));
        b.abandon();
        assert_eq!(b.allow(t1), Some(true));
    }
}
