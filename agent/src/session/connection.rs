//! One connection to the controller, from connect to its end: the
//! handshake, then a reader task applying the controller's frames and a
//! writer loop (here) sending heartbeats and whatever the leases queued.
//! Returns a [`SessionEnd`] saying why the connection ended; the daemon's
//! reconnect loop decides what follows.

use std::{collections::HashMap, error::Error as _, fmt, time::Duration};

use portfleet_telemetry::{ErrorChain, with_causes};

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

    /// Logs the end at the level it deserves; [`EndLog`] decides whether
    /// it is news.
    pub fn log(&self, controller: &str) {
        match self {
            Self::Unreachable(e) => tracing::warn!(controller, error = %ErrorChain(e), "{self}"),
            Self::Refused(s) | Self::Broken(s) => {
                tracing::warn!(code = ?s.code(), error = %status_error(s), "{self}")
            }
            Self::Closed | Self::HandedBack => tracing::info!("{self}"),
            Self::NoWelcome | Self::NotWelcome | Self::Lost | Self::GaveUp => tracing::warn!("{self}"),
        }
    }

    /// For an end that never got a session going, and so may repeat on
    /// every attempt: which failure this is, to tell a repeat from news. A
    /// refusal is known by its code alone: its message may change from one
    /// attempt to the next (how long ago the live session was heard from).
    fn failure(&self) -> Option<String> {
        match self {
            Self::Unreachable(e) => Some(ErrorChain(e).to_string()),
            Self::Refused(s) => Some(format!("{:?}", s.code())),
            Self::NoWelcome | Self::NotWelcome => Some(self.to_string()),
            Self::Closed | Self::Broken(_) | Self::Lost | Self::HandedBack | Self::GaveUp => None,
        }
    }

    /// What went wrong, for a repeat's log line.
    fn error(&self) -> String {
        match self {
            Self::Unreachable(e) => ErrorChain(e).to_string(),
            Self::Refused(s) | Self::Broken(s) => status_error(s),
            _ => self.to_string(),
        }
    }
}

/// A status's message and, for one made from a transport failure, its
/// causes.
fn status_error(s: &tonic::Status) -> String {
    with_causes(s.message(), s.source())
}

/// How often a failure that keeps repeating is logged again at WARN.
const REMIND_EVERY: Duration = Duration::from_secs(60);

/// Logs connection ends so that a failure repeating on every attempt (the
/// controller down, or refusing this agent) is one WARN line, then a
/// reminder a minute with how long it has lasted, not a line per retry.
#[derive(Debug, Default)]
pub struct EndLog {
    streak: Option<Streak>,
}

#[derive(Debug)]
struct Streak {
    failure: String,
    began: Instant,
    reminded: Instant,
    attempts: u32,
}

impl EndLog {
    /// Logs `end`; returns whether that was above DEBUG (news, or a
    /// reminder).
    pub fn log(&mut self, end: &SessionEnd, controller: &str) -> bool {
        let now = Instant::now();
        let failure = end.failure();
        if let (Some(f), Some(s)) = (&failure, &mut self.streak)
            && *f == s.failure
        {
            s.attempts += 1;
            if now.duration_since(s.reminded) < REMIND_EVERY {
                tracing::debug!(attempts = s.attempts, error = %end.error(), "{end}, again");
                return false;
            }
            s.reminded = now;
            let for_s = now.duration_since(s.began).as_secs();
            tracing::warn!(controller, attempts = s.attempts, for_s, error = %end.error(), "{end}, still");
            return true;
        }
        end.log(controller);
        self.streak = failure.map(|failure| Streak { failure, began: now, reminded: now, attempts: 1 });
        true
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
    crate::metrics::session(true);
    let mut reader = agent.tasks.spawn(reader::run(agent.clone(), source).in_current_span());
    let end = write(agent, &sink, welcome.heartbeat, &mut reader, give_up).await;
    reader.abort();
    crate::metrics::session(false);
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

    #[tokio::test(start_paused = true)]
    async fn a_repeating_refusal_is_logged_once_then_reminded_each_minute() {
        // The message changes between attempts; the refusal is the same.
        let refused = || {
            let ago = rand::random_range(0.0..10.0);
            SessionEnd::Refused(tonic::Status::already_exists(format!("live session, last heartbeat {ago:.1}s ago")))
        };
        let mut log = EndLog::default();
        assert!(log.log(&refused(), "c"), "the first refusal is news");
        for _ in 0..10 {
            tokio::time::advance(Duration::from_secs(4)).await;
            assert!(!log.log(&refused(), "c"), "a repeat every retry is not");
        }
        tokio::time::advance(Duration::from_secs(20)).await;
        assert!(log.log(&refused(), "c"), "a minute on, a reminder");
        assert!(!log.log(&refused(), "c"));
        // Another failure is news; so is the same one after a session.
        assert!(log.log(&SessionEnd::NoWelcome, "c"));
        assert!(log.log(&refused(), "c"));
        assert!(log.log(&SessionEnd::Closed, "c"));
        assert!(log.log(&refused(), "c"));
        assert!(log.log(&SessionEnd::Refused(tonic::Status::failed_precondition("no common version")), "c"));
    }
}
