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
    /// that failed together do not retry together), then the step doubles.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.current.mul_f64(rand::random_range(0.5..1.5)).min(self.max);
        self.current = (self.current * 2).min(self.max);
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
}
