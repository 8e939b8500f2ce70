//! Jittered exponential backoff: the one retry schedule for reconnect and
//! retry loops on both sides (agent sessions, the AMQP ingress, database
//! waits). Pure: callers sleep for [`Backoff::next_delay`] under their own
//! cancellation token.

use std::time::Duration;

#[derive(Clone, Debug)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// Delays start near `initial` and double up to `max`.
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max: max.max(initial), current: initial }
    }

    /// The next delay: the current step with +-50% jitter (so many clients
    /// that failed together do not retry together), never over `max`, then
    /// the step doubles. At the cap the delay is drawn from `max/2..=max`
    /// rather than clipped, so clients waiting at the cap stay spread out
    /// instead of half of them landing on `max` together.
    pub fn next_delay(&mut self) -> Duration {
        let (low, high) = (self.current / 2, (self.current.saturating_mul(3) / 2).min(self.max));
        let delay = low + (high - low).mul_f64(rand::random_range(0.0..=1.0));
        self.current = (self.current * 2).min(self.max);
        delay
    }

    /// The delay [`Backoff::next_delay`] gives on its `n`th call (n >= 1):
    /// for retries whose count is stored rather than held in a loop.
    pub fn nth_delay(initial: Duration, max: Duration, n: u32) -> Duration {
        let mut b = Self::new(initial, max);
        let mut delay = initial;
        // Past 64 doublings every step is at the cap.
        for _ in 0..n.clamp(1, 64) {
            delay = b.next_delay();
        }
        delay
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.current = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let first = b.next_delay();
        assert!((Duration::from_millis(50)..=Duration::from_millis(150)).contains(&first), "{first:?}");
        for _ in 0..20 {
            assert!(b.next_delay() <= Duration::from_secs(2));
        }
        assert!(b.next_delay() >= Duration::from_secs(1));
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(150));
    }

    #[test]
    fn delays_at_the_cap_stay_under_it_and_spread_out() {
        let max = Duration::from_secs(4);
        let mut b = Backoff::new(Duration::from_millis(100), max);
        let delays: Vec<Duration> = (0..400).map(|_| b.next_delay()).collect();
        assert!(delays.iter().all(|d| *d <= max), "{delays:?}");
        let at_cap = &delays[10..];
        assert!(at_cap.iter().all(|d| *d >= max / 2), "{at_cap:?}");
        // Jittered, not clipped: few (if any) land on the cap exactly.
        assert!(at_cap.iter().filter(|d| **d == max).count() < 10, "{at_cap:?}");
        let mean = at_cap.iter().sum::<Duration>() / at_cap.len() as u32;
        assert!(mean < max * 85 / 100, "{mean:?}");
    }
}
