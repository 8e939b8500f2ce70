//! The agent's metrics (docs/operations.md): probe and reply counters fed
//! from each shard's engine checkpoints, session state, heartbeat round
//! trips, and a sampler for the gauges (leases, assigned and achieved
//! rates, frames awaiting the controller's ack). Without
//! `--metrics-listen` no recorder is installed and these are no-ops.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use portfleet_telemetry::metrics::Health;
use tokio_util::sync::CancellationToken;

use crate::engine::Counts;

/// How often the gauges are sampled.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(2);

/// Probes sent by every engine of this process, for the achieved rate.
static PROBES_SENT: AtomicU64 = AtomicU64::new(0);
/// A session was established once: the next one is a reconnect.
static EVER_CONNECTED: AtomicBool = AtomicBool::new(false);
/// The readiness checks, once `--metrics-listen` set them up.
static READINESS: OnceLock<Health> = OnceLock::new();

/// The readiness checks of `/readyz`: `session`.
pub fn readiness() -> Health {
    READINESS.get_or_init(|| Health::new(&["session"])).clone()
}

/// A session with a controller opened (`true`) or ended.
pub fn session(open: bool) {
    if open && EVER_CONNECTED.swap(true, Ordering::Relaxed) {
        metrics::counter!("portfleet_agent_session_reconnects_total").increment(1);
    }
    metrics::gauge!("portfleet_agent_connected").set(if open { 1.0 } else { 0.0 });
    if let Some(h) = READINESS.get() {
        h.set("session", open);
    }
}

/// A heartbeat sent at `sent` came back.
pub fn heartbeat_echoed(sent: tokio::time::Instant) {
    metrics::histogram!("portfleet_agent_heartbeat_rtt_seconds").record(sent.elapsed().as_secs_f64());
}

/// Turns one engine's cumulative counts into counter increments.
#[derive(Debug, Default)]
pub struct ShardMeter {
    last: Counts,
}

impl ShardMeter {
    /// `now` are the engine's counts so far (they only grow).
    pub fn observe(&mut self, now: &Counts) {
        let d = |now: u64, last: u64| now.saturating_sub(last);
        let (l, sent) = (&self.last, d(now.sent, self.last.sent));
        PROBES_SENT.fetch_add(sent, Ordering::Relaxed);
        metrics::counter!("portfleet_agent_probes_sent_total").increment(sent);
        let open = d(now.open, l.open);
        metrics::counter!("portfleet_agent_open_ports_total").increment(open);
        metrics::counter!("portfleet_agent_replies_total", "kind" => "open").increment(open);
        metrics::counter!("portfleet_agent_replies_total", "kind" => "closed").increment(d(now.closed, l.closed));
        metrics::counter!("portfleet_agent_replies_total", "kind" => "late").increment(d(now.late, l.late));
        metrics::counter!("portfleet_agent_unanswered_total").increment(d(now.filtered, l.filtered));
        metrics::counter!("portfleet_agent_kernel_drops_total").increment(d(now.dropped, l.dropped));
        metrics::counter!("portfleet_agent_probes_denied_total").increment(d(now.denied, l.denied));
        self.last = *now;
    }
}

/// What the sampler reads off the leases in hand.
#[derive(Clone, Copy, Debug, Default)]
pub struct LeaseGauges {
    pub held: usize,
    /// Probes per second the controller assigned, over all leases.
    pub assigned_rate: u64,
    /// Frames sent and not yet acknowledged (results waiting on the
    /// controller's commit: a full outbox pauses the engine).
    pub unacked: usize,
}

/// Samples the gauges from `read` until `cancel`.
pub async fn sample(read: impl Fn() -> LeaseGauges, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
    let (mut last_sent, mut last_at) = (PROBES_SENT.load(Ordering::Relaxed), Instant::now());
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let g = read();
        metrics::gauge!("portfleet_agent_leases_held").set(g.held as f64);
        metrics::gauge!("portfleet_agent_rate_assigned").set(g.assigned_rate as f64);
        metrics::gauge!("portfleet_agent_frames_unacked").set(g.unacked as f64);
        let (sent, at) = (PROBES_SENT.load(Ordering::Relaxed), Instant::now());
        let secs = at.duration_since(last_at).as_secs_f64();
        if secs > 0.0 {
            metrics::gauge!("portfleet_agent_rate_achieved").set(sent.saturating_sub(last_sent) as f64 / secs);
        }
        (last_sent, last_at) = (sent, at);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meters_add_only_what_is_new() {
        let mut m = ShardMeter::default();
        let before = PROBES_SENT.load(Ordering::Relaxed);
        m.observe(&Counts { sent: 10, open: 1, ..Counts::default() });
        m.observe(&Counts { sent: 25, open: 1, closed: 3, ..Counts::default() });
        assert_eq!(PROBES_SENT.load(Ordering::Relaxed) - before, 25);
        assert_eq!(m.last.closed, 3);
    }
}
