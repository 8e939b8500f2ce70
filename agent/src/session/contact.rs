//! How fresh this agent's leases are known to be, and the watchdog that
//! holds every engine when they may have lapsed (docs/protocol.md, "Leases,
//! fencing, and what is never lost").
//!
//! The controller echoes the send time of the agent's latest heartbeat
//! once it has extended the agent's leases after receiving it; the send
//! time is on this agent's monotonic clock ([`Clock`]), so a lease lasts at
//! least until that time plus the lapse the Welcome announced. The
//! watchdog holds probing a margin before that moment passes without a
//! fresher echo, and releases it when one comes.

use std::{
    sync::{Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::leases::Leases;

/// How often the watchdog looks.
const WATCH_EVERY: Duration = Duration::from_millis(100);

/// Heartbeat times on this agent's monotonic clock (tokio's, so tests can
/// pause it), as wall-clock times the controller echoes back unchanged.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    wall: SystemTime,
    mono: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Self { wall: SystemTime::now(), mono: Instant::now() }
    }

    /// `at` as a time to send.
    pub fn stamp(&self, at: Instant) -> SystemTime {
        self.wall.checked_add(at.saturating_duration_since(self.mono)).unwrap_or(self.wall)
    }

    /// The instant a stamp of ours names; `None` for anything else.
    pub fn unstamp(&self, at: SystemTime) -> Option<Instant> {
        let since = at.duration_since(self.wall).ok()?;
        let at = self.mono.checked_add(since)?;
        (at <= Instant::now()).then_some(at)
    }
}

#[derive(Clone, Copy, Debug)]
struct Freshness {
    /// The controller extended this agent's leases after this instant.
    fresh: Instant,
    /// Hold probing once `fresh` is this old: the Welcome's lapse less a
    /// margin. `None`: no lapse announced.
    hold_after: Option<Duration>,
    /// This controller echoes heartbeats (older ones do not: no hold then).
    echoes: bool,
}

/// What this agent knows about its leases' freshness.
#[derive(Debug)]
pub struct Contact {
    clock: Clock,
    state: Mutex<Freshness>,
}

impl Default for Contact {
    fn default() -> Self {
        Self::new()
    }
}

impl Contact {
    pub fn new() -> Self {
        Self {
            clock: Clock::new(),
            state: Mutex::new(Freshness { fresh: Instant::now(), hold_after: None, echoes: false }),
        }
    }

    fn state(&self) -> MutexGuard<'_, Freshness> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// A Welcome: the controller adopted (and so extended) or revoked every
    /// held lease after `hello_sent`; leases lapse no sooner than `lapse`
    /// after an extension.
    pub fn welcomed(&self, hello_sent: Instant, lapse: Option<Duration>, echoes: bool) {
        let mut c = self.state();
        c.hold_after = lapse.map(|lapse| lapse.saturating_sub((lapse / 10).max(Duration::from_millis(250))));
        c.echoes = echoes;
        c.fresh = c.fresh.max(hello_sent);
    }

    /// The controller echoed a heartbeat sent at `sent_at`.
    pub fn echoed(&self, sent_at: SystemTime) {
        if let Some(at) = self.clock.unstamp(sent_at) {
            crate::metrics::heartbeat_echoed(at);
            let mut c = self.state();
            c.fresh = c.fresh.max(at);
        }
    }

    /// How long the controller has been silent, when that is longer than
    /// the leases are sure to last.
    fn silent_too_long(&self) -> Option<Duration> {
        let c = *self.state();
        let silent = c.fresh.elapsed();
        (c.echoes && c.hold_after.is_some_and(|d| silent > d)).then_some(silent)
    }
}

/// Holds every shard's engine while the controller is silent for longer
/// than its leases are sure to last (a partition, a frozen controller), so
/// this agent never probes under a lease the fleet may have handed to
/// another agent; releases them when the controller is heard again (a
/// reconnect drops the leases that did lapse first). Runs until `done`.
pub async fn watchdog(contact: &Contact, leases: &Leases, done: CancellationToken) {
    let mut said = Said::Nothing;
    let mut tick = tokio::time::interval(WATCH_EVERY);
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tick.tick() => {}
        }
        let silent = contact.silent_too_long();
        let leases = leases.all();
        match said.next(silent.is_some(), leases.len()) {
            Some(Said::Holding) => tracing::warn!(
                silent_ms = silent.map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                shards = leases.len(),
                "no word from the controller: holding probes until it answers (leases may have lapsed)"
            ),
            Some(Said::Nothing) => tracing::info!("controller heard again: probing resumes"),
            None => {}
        }
        for lease in &leases {
            lease.control().set_offline(silent.is_some());
        }
    }
}

/// What the watchdog last told the log. Holding matters only to shards in
/// hand: an idle agent whose controller is away holds nothing and says
/// nothing (the session's own log says the controller is away).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Said {
    Nothing,
    Holding,
}

impl Said {
    /// What to log now, if anything, given whether leases may have lapsed
    /// and how many shards are in hand.
    fn next(&mut self, lapsing: bool, shards: usize) -> Option<Said> {
        let now = match (*self, lapsing) {
            (Said::Nothing, true) if shards > 0 => Said::Holding,
            (Said::Holding, false) => Said::Nothing,
            _ => return None,
        };
        *self = now;
        Some(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_stamps_come_back_as_the_same_instant() {
        let clock = Clock::new();
        let at = Instant::now();
        let back = clock.unstamp(clock.stamp(at)).expect("our own stamp");
        let diff = if back > at { back - at } else { at - back };
        assert!(diff < Duration::from_micros(1), "{diff:?}");
        // Not ours: before the clock started, in the future.
        assert_eq!(clock.unstamp(SystemTime::UNIX_EPOCH + Duration::from_secs(1)), None);
        assert_eq!(clock.unstamp(clock.stamp(Instant::now() + Duration::from_secs(60))), None);
    }

    #[test]
    fn holding_is_logged_only_with_shards_in_hand_and_its_end_only_after_it() {
        let mut said = Said::Nothing;
        // The controller away while the agent is idle: nothing to hold.
        assert_eq!(said.next(true, 0), None);
        assert_eq!(said.next(false, 0), None);
        // A shard in hand: holding is news, once.
        assert_eq!(said.next(true, 1), Some(Said::Holding));
        assert_eq!(said.next(true, 1), None);
        assert_eq!(said.next(true, 0), None);
        assert_eq!(said.next(false, 0), Some(Said::Nothing));
        assert_eq!(said.next(false, 2), None);
    }

    #[tokio::test(start_paused = true)]
    async fn holds_only_for_an_echoing_controller_silent_past_the_lapse_less_a_margin() {
        let contact = Contact::new();
        contact.welcomed(Instant::now(), Some(Duration::from_secs(3)), true);
        // Hold after 3 s less max(250 ms, 10%) = 2.7 s.
        tokio::time::advance(Duration::from_millis(2600)).await;
        assert_eq!(contact.silent_too_long(), None);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(contact.silent_too_long().is_some());
        // An echo of a heartbeat sent just now makes the leases fresh again.
        contact.echoed(contact.clock().stamp(Instant::now()));
        assert_eq!(contact.silent_too_long(), None);
        // A controller that does not echo is never waited for.
        let old = Contact::new();
        old.welcomed(Instant::now(), Some(Duration::from_secs(3)), false);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(old.silent_too_long(), None);
    }
}
