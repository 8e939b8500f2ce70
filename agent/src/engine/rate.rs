//! A token bucket that holds a probe rate: pure arithmetic over an
//! injected clock, so the send threads (std time) and the connect scanner
//! (tokio time, paused in tests) share it.

use std::time::Duration;

use super::EngineControl;

#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// `rate` tokens per second; at most about 5 ms (and at most 64) of
    /// them accumulate, so a stall is not followed by a burst.
    pub fn new(rate: u32, now: Duration) -> Self {
        let rate = f64::from(rate.max(1));
        let burst = (rate / 200.0).clamp(1.0, 64.0);
        Self { rate, burst, tokens: burst.min(1.0), last: now }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Changes the rate from now on; tokens already saved stay, capped to
    /// the new burst.
    pub fn set_rate(&mut self, rate: u32) {
        self.rate = f64::from(rate.max(1));
        self.burst = (self.rate / 200.0).clamp(1.0, 64.0);
        self.tokens = self.tokens.min(self.burst);
    }

    /// Takes up to `want` tokens at time `now`. Returns how many were
    /// granted, or, when none are available, how long until one is.
    pub fn take(&mut self, now: Duration, want: u32) -> Result<u32, Duration> {
        let elapsed = now.saturating_sub(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let granted = self.tokens.floor().min(f64::from(want));
        if granted >= 1.0 {
            self.tokens -= granted;
            return Ok(granted as u32);
        }
        Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
    }
}

/// The bucket for async code, on tokio's clock, following the rate of an
/// [`EngineControl`].
#[derive(Debug)]
pub struct AsyncRateLimiter {
    bucket: tokio::sync::Mutex<TokenBucket>,
    epoch: tokio::time::Instant,
    control: std::sync::Arc<EngineControl>,
}

impl AsyncRateLimiter {
    pub fn new(control: std::sync::Arc<EngineControl>) -> Self {
        Self {
            bucket: tokio::sync::Mutex::new(TokenBucket::new(control.rate(), Duration::ZERO)),
            epoch: tokio::time::Instant::now(),
            control,
        }
    }

    /// Waits for one token.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut b = self.bucket.lock().await;
                let rate = self.control.rate();
                if f64::from(rate) != b.rate() {
                    b.set_rate(rate);
                }
                match b.take(self.epoch.elapsed(), 1) {
                    Ok(_) => return,
                    Err(wait) => wait,
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates a sender asking for batches of 64 as fast as allowed.
    fn achieved(rate: u32, secs: f64) -> f64 {
        let mut b = TokenBucket::new(rate, Duration::ZERO);
        let mut now = Duration::ZERO;
        let end = Duration::from_secs_f64(secs);
        let mut sent = 0u64;
        while now < end {
            match b.take(now, 64) {
                Ok(n) => sent += u64::from(n),
                Err(wait) => now += wait.max(Duration::from_nanos(1)),
            }
        }
        sent as f64 / secs
    }

    #[test]
    fn holds_the_rate_within_five_percent_over_a_second() {
        for rate in [10, 100, 1_000, 10_000, 100_000, 300_000, 1_000_000] {
            let got = achieved(rate, 1.0);
            let err = (got - f64::from(rate)).abs() / f64::from(rate);
            assert!(err <= 0.05, "rate {rate}: achieved {got:.0} ({:.1}% off)", err * 100.0);
        }
    }

    #[test]
    fn a_new_rate_applies_at_once() {
        let mut b = TokenBucket::new(1_000, Duration::ZERO);
        b.set_rate(100_000);
        let mut now = Duration::ZERO;
        let mut sent = 0u64;
        while now < Duration::from_secs(1) {
            match b.take(now, 64) {
                Ok(n) => sent += u64::from(n),
                Err(wait) => now += wait.max(Duration::from_nanos(1)),
            }
        }
        assert!((95_000..=105_000).contains(&sent), "{sent}");
    }

    #[test]
    fn a_stall_does_not_become_a_burst() {
        let mut b = TokenBucket::new(100_000, Duration::ZERO);
        let granted = b.take(Duration::from_secs(10), 10_000).unwrap();
        assert!(granted <= 64, "{granted} tokens after a stall");
    }

    #[tokio::test(start_paused = true)]
    async fn async_limiter_holds_the_rate_in_paused_time() {
        let limiter = AsyncRateLimiter::new(std::sync::Arc::new(EngineControl::new(2_000)));
        let start = tokio::time::Instant::now();
        for _ in 0..4_000 {
            limiter.acquire().await;
        }
        let secs = start.elapsed().as_secs_f64();
        assert!((1.9..=2.1).contains(&secs), "4000 tokens at 2000/s took {secs:.3}s");
    }
}
