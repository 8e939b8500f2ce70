//! One connection to the controller, from connect to its end: the
//! handshake, then a reader task applying the controller's frames and a
//! writer loop (here) sending heartbeats and whatever the leases queued.
//! Returns a [`SessionEnd`] saying why the connection ended; the daemon's
//! reconnect loop decides what follows.

use std::{collections::HashMap, fmt, time::Duration};

use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;
use tracing::Instrument;

use super::{
    Agent, handshake, reader,
    wire::{FrameSink, Heartbeat, LeaseId, Outbound},
};

/// Why a connection ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The controller could not be reached.
    Unreachable(tonic::transport::Error),
    /// The controller ended the stream with a status before its Welcome
    /// (docs/protocol.md, "Statuses that end a stream").
    Refused(tonic::Status),
    /// No Welcome in time.
    NoWelcome,
    /// The controller's first frame was not a Welcome, or it closed the
    /// stream instead.
    NotWelcome,
    /// The controller closed an established session.
    Closed,
    /// An established session's stream ended with a status.
    Broken(tonic::Status),
    /// The stream went away while frames were being written.
    Lost,
    /// Shutting down, and every shard is handed back.
    HandedBack,
    /// Shutting down, and the time to hand shards back ran out.
    GaveUp,
}

impl SessionEnd {
    /// A session was established before it ended: reconnecting starts again
    /// from the shortest delay.
    pub fn was_established(&self) -> bool {
        matches!(self, Self::Closed | Self::Broken(_) | Self::Lost | Self::HandedBack | Self::GaveUp)
    }

    /// The daemon is done: no reconnect.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::HandedBack | Self::GaveUp)
    }

    /// Logs the end, once, at the level it deserves.
    pub fn log(&self, controller: &str) {
        match self {
            Self::Unreachable(e) => tracing::warn!(controller, error = %e, "cannot reach the controller"),
            Self::Refused(s) | Self::Broken(s) => {
                tracing::warn!(code = ?s.code(), message = s.message(), "{self}")
            }
            Self::Closed | Self::HandedBack => tracing::info!("{self}"),
            Self::NoWelcome | Self::NotWelcome | Self::Lost | Self::GaveUp => tracing::warn!("{self}"),
        }
    }
}

impl fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unreachable(_) => "cannot reach the controller",
            Self::Refused(_) => "session refused by the controller",
            Self::NoWelcome => "no Welcome from the controller",
            Self::NotWelcome => "the controller's first frame was not Welcome",
            Self::Closed => "controller closed the session",
            Self::Broken(_) => "session stream ended",
            Self::Lost => "connection lost",
            Self::HandedBack => "all shards handed back",
            Self::GaveUp => "could not hand every shard back in time; their leases will lapse",
        })
    }
}

/// Connects, shakes hands and runs the session until it ends or `give_up`.
pub async fn run(agent: &std::sync::Arc<Agent>, endpoint: Endpoint, give_up: &CancellationToken) -> SessionEnd {
    let connected = tokio::select! {
        _ = give_up.cancelled() => return SessionEnd::GaveUp,
        c = endpoint.connect() => c,
    };
    let channel = match connected {
        Ok(c) => c,
        Err(e) => return SessionEnd::Unreachable(e),
    };
    let (sink, source, welcome) = match handshake::run(agent, channel).await {
        Ok(h) => h,
        Err(end) => return end,
    };
    tracing::Span::current().record("generation", welcome.generation);
    tracing::info!(controller_id = %welcome.controller_id, protocol_version = welcome.protocol_version,
        "session established");
    let mut reader = agent.tasks.spawn(reader::run(agent.clone(), source).in_current_span());
    let end = write(agent, &sink, welcome.heartbeat, &mut reader, give_up).await;
    reader.abort();
    end
}

/// Sends heartbeats and queued frames until the reader sees the stream
/// end, the stream goes away, or shutdown is over.
async fn write(
    agent: &Agent,
    sink: &FrameSink,
    heartbeat: Duration,
    reader: &mut JoinHandle<SessionEnd>,
    give_up: &CancellationToken,
) -> SessionEnd {
    let mut tick = tokio::time::interval(heartbeat);
    let mut meter = RateMeter::new();
    loop {
        let beat = tokio::select! {
            end = &mut *reader => return end.unwrap_or(SessionEnd::Lost),
            _ = give_up.cancelled() => return SessionEnd::GaveUp,
            _ = tick.tick() => true,
            _ = agent.leases.outgoing().notified() => false,
        };
        if beat {
            let hb = meter.heartbeat(agent);
            if let Err(end) = send(sink, reader, Outbound::Heartbeat(hb)).await {
                return end;
            }
        }
        for lease in agent.leases.all() {
            for frame in lease.take_unsent() {
                if let Err(end) = send(sink, reader, Outbound::Shard(frame)).await {
                    return end;
                }
            }
        }
        agent.leases.reap();
        if agent.is_stopping() && agent.leases.is_empty() {
            return SessionEnd::HandedBack;
        }
    }
}

/// Sends one frame, unless the reader sees the stream end first.
async fn send(sink: &FrameSink, reader: &mut JoinHandle<SessionEnd>, frame: Outbound) -> Result<(), SessionEnd> {
    tokio::select! {
        end = &mut *reader => Err(end.unwrap_or(SessionEnd::Lost)),
        sent = sink.send(frame) => sent.map_err(|_| SessionEnd::Lost),
    }
}

/// Probes per second across leases between heartbeats.
struct RateMeter {
    last_sent: HashMap<LeaseId, u64>,
    last_beat: Instant,
}

impl RateMeter {
    fn new() -> Self {
        Self { last_sent: HashMap::new(), last_beat: Instant::now() }
    }

    fn heartbeat(&mut self, agent: &Agent) -> Heartbeat {
        let leases = agent.leases.all();
        let mut delta = 0u64;
        for lease in &leases {
            if let Some(sent) = lease.probes_sent() {
                let last = self.last_sent.insert(lease.id(), sent).unwrap_or(0);
                delta = delta.saturating_add(sent.saturating_sub(last));
            }
        }
        self.last_sent.retain(|id, _| leases.iter().any(|l| l.id() == *id));
        let active = leases.iter().filter(|l| !l.is_finished()).count();
        let now = Instant::now();
        let elapsed = now - self.last_beat;
        self.last_beat = now;
        Heartbeat {
            sent_at: agent.contact.clock().stamp(now),
            current_rate: per_second(delta, elapsed),
            active_shards: u32::try_from(active).unwrap_or(u32::MAX),
        }
    }
}

/// `count` over `elapsed` (at least a millisecond), per second.
fn per_second(count: u64, elapsed: Duration) -> u32 {
    let micros = elapsed.as_micros().max(1000);
    u32::try_from(u128::from(count) * 1_000_000 / micros).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_per_second_and_saturate() {
        assert_eq!(per_second(500, Duration::from_millis(500)), 1000);
        assert_eq!(per_second(1, Duration::ZERO), 1000);
        assert_eq!(per_second(u64::MAX, Duration::from_secs(1)), u32::MAX);
    }

    #[test]
    fn only_established_sessions_reset_the_backoff_and_only_shutdown_is_final() {
        assert!(SessionEnd::Closed.was_established() && !SessionEnd::Closed.is_final());
        assert!(!SessionEnd::NoWelcome.was_established());
        assert!(!SessionEnd::Refused(tonic::Status::aborted("newer session")).was_established());
        assert!(SessionEnd::HandedBack.is_final() && SessionEnd::GaveUp.is_final());
    }
}
