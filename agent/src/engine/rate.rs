//! A token bucket that holds a probe rate: pure arithmetic over an
//! injected clock, so the send threads (std time) and the connect scanner
//! (tokio time, paused in tests) share it.

use std::time::Duration;

use super::EngineControl;

/// Most tokens a bucket saves: 5 ms at 800k probes/s.
const MAX_BURST: f64 = 4096.0;

#[derive(Clone, Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Duration,
}

impl TokenBucket {
    /// `rate` tokens per second; at most about 5 ms of them accumulate
    /// (at most 4,096), so a stall is not followed by a long burst,
    /// while a send thread that woke a little late (a busy host) makes up
    /// for it instead of losing the rate.
    pub fn new(rate: u32, now: Duration) -> Self {
        let rate = f64::from(rate.max(1));
        let burst = (rate / 200.0).clamp(1.0, MAX_BURST);
        Self { rate, burst, tokens: burst.min(1.0), last: now }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Changes the rate from now on; tokens already saved stay, capped to
    /// the new burst.
    pub fn set_rate(&mut self, rate: u32) {
        self.rate = f64::from(rate.max(1));
        self.burst = (self.rate / 200.0).clamp(1.0, MAX_BURST);
        self.tokens = self.tokens.min(self.burst);
    }

    /// Spends `n` tokens used elsewhere (identification connections under
    /// the same rate); the balance may go negative, by at most a second's
    /// worth, which later takes wait out.
    pub fn charge(&mut self, n: u32) {
        self.tokens = (self.tokens - f64::from(n)).max(-self.rate);
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
    /// A limiter beside the engine (identification) charges each token to
    /// the control, which the engine's limiters pay.
    beside: bool,
}

impl AsyncRateLimiter {
    /// The engine's own limiter: pays what others charged.
    pub fn new(control: std::sync::Arc<EngineControl>) -> Self {
        Self {
            bucket: tokio::sync::Mutex::new(TokenBucket::new(control.rate(), Duration::ZERO)),
            epoch: tokio::time::Instant::now(),
            control,
            beside: false,
        }
    }

    /// A limiter for work beside the engine under the same rate: never
    /// faster than the rate alone, and every token taken is charged to
    /// the engine, so both together keep to it.
    pub fn beside(control: std::sync::Arc<EngineControl>) -> Self {
        Self { beside: true, ..Self::new(control) }
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
                if !self.beside {
                    b.charge(self.control.take_charged());
                }
                match b.take(self.epoch.elapsed(), 1) {
                    Ok(_) if self.beside => return self.control.charge(1),
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
    fn a_stall_becomes_at_most_five_milliseconds_of_burst() {
        let mut b = TokenBucket::new(100_000, Duration::ZERO);
        let granted = b.take(Duration::from_secs(10), 100_000).unwrap();
        assert_eq!(granted, 500, "5 ms at 100k/s after a 10 s stall");
        // However fast the rate, the saved tokens are bounded.
        let mut b = TokenBucket::new(10_000_000, Duration::ZERO);
        assert_eq!(b.take(Duration::from_secs(10), u32::MAX).unwrap(), 4096);
    }

    /// A send thread that wakes 1 ms late (a busy host) makes the time
    /// up: the rate holds over a second of late wake-ups.
    #[test]
    fn late_wake_ups_do_not_lose_the_rate() {
        let mut b = TokenBucket::new(100_000, Duration::ZERO);
        let mut now = Duration::ZERO;
        let mut sent = 0u64;
        while now < Duration::from_secs(1) {
            match b.take(now, 64) {
                Ok(n) => sent += u64::from(n),
                // Asked to wait microseconds, the thread sleeps 1 ms.
                Err(_) => now += Duration::from_millis(1),
            }
        }
        assert!(sent >= 99_000, "{sent} probes in a second at 100k/s");
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

    #[test]
    fn charged_tokens_are_paid_before_new_ones_are_granted() {
        let mut b = TokenBucket::new(1_000, Duration::ZERO);
        b.charge(500);
        // Half a second of tokens is owed: none until it is paid off.
        assert!(b.take(Duration::from_millis(400), 64).is_err());
        assert!(b.take(Duration::from_millis(520), 64).is_ok());
        // The debt is bounded by one second's worth.
        let mut b = TokenBucket::new(100, Duration::ZERO);
        b.charge(1_000_000);
        assert!(b.take(Duration::from_millis(1_050), 1).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn work_beside_the_engine_is_charged_to_it() {
        let control = std::sync::Arc::new(EngineControl::new(1_000));
        let beside = AsyncRateLimiter::beside(control.clone());
        for _ in 0..3 {
            beside.acquire().await;
        }
        assert_eq!(control.take_charged(), 3);
        assert_eq!(control.take_charged(), 0);
    }
}
