//! The agent daemon's side of `AgentService.Session` (docs/protocol.md).
//!
//! One connection at a time, re-opened forever with jittered exponential
//! backoff, while the shards keep scanning into bounded outboxes; a full
//! outbox pauses its engine, so a slow or absent controller slows the scan
//! instead of piling results up. By concern:
//!
//! - `wire`: the only code that touches the protocol's frames; converts
//!   them into validated domain values and back.
//! - `connection`: one connection - connect, `handshake`, the reader
//!   task (`reader`) and the writer loop - ending in a `SessionEnd`.
//! - `leases`: the leases in hand. Each shard task (`shard`) works
//!   through its own lease handle (outbox, stop token and mode, engine
//!   control, live counts), never through the registry.
//! - `contact`: how fresh the leases are known to be, and the watchdog
//!   that holds probing when they may have lapsed.
//! - [`renew`], `state`: the certificate and the files of this agent.
//!
//! Every task of the daemon - readers, shard tasks, the watchdog, renewal,
//! the shutdown timer - runs in one `TaskTracker`, closed and awaited when
//! [`run`] returns.

mod connection;
mod contact;
mod handshake;
mod leases;
mod outbox;
mod reader;
pub mod renew;
mod shard;
mod state;
mod wire;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use portfleet_core::{backoff::Backoff, labels::Labels};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::transport::Endpoint;
use tracing::Instrument;
use uuid::Uuid;

pub use self::state::{StateLock, lock, read_labels, state_path, write_labels};
use self::{
    connection::{EndLog, SessionEnd},
    contact::Contact,
    leases::Leases,
    shard::ShardSettings,
    wire::{Capabilities, Limits},
};
use crate::net::NetOptions;

/// Reconnect delays: jittered, from about this ...
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
/// ... doubling up to this (jittered within its upper half): an agent is
/// back within this long of its controller's return, however long the
/// outage. A refused or unreachable attempt costs the controller next to
/// nothing, so a fleet retrying this often is no load.
const RECONNECT_MAX: Duration = Duration::from_secs(5);

/// How long the daemon waits for its tasks to stop once it is done.
const TASKS_STOP_WITHIN: Duration = Duration::from_secs(1);

/// Everything the daemon needs, whatever the source.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub controller: String,
    pub name: String,
    pub labels: Labels,
    /// Probes per second over all shards; 0 for no limit.
    pub max_rate: u32,
    pub max_shards: u32,
    pub state_dir: PathBuf,
    pub net: NetOptions,
    /// Longest wait for a reply to a probe.
    pub wait: Duration,
    /// How long a SIGTERM may take to hand shards back.
    pub shutdown_timeout: Duration,
    /// What this agent will probe, whatever it is assigned.
    pub policy: Arc<portfleet_core::ScopePolicy>,
    /// TLS to the controller (an https:// URL needs it).
    pub tls: Option<ClientTls>,
    /// Service identification; `None` reports open ports only.
    pub identifier: Option<Arc<crate::identify::Identifier>>,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("agent state file {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--controller {0}: {1}")]
    BadController(String, String),
    #[error("agent {name} is already running, {}", pid.map_or_else(|| "pid unknown".to_string(), |p| format!("pid {p}")))]
    AlreadyRunning { name: String, pid: Option<u32> },
}

/// PEM material for TLS to the controller.
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca: Vec<u8>,
    /// Certificate and key for mTLS.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// Files of an enrolled identity (certificate, key): renewed in place
    /// before the certificate expires.
    pub renew: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    fn config(&self) -> tonic::transport::ClientTlsConfig {
        let identity = self.identity.as_ref().map(|(c, k)| (c.as_slice(), k.as_slice()));
        portfleet_proto::auth::client_tls(&self.ca, identity)
    }
}

/// What the daemon's connections and tasks share. Shard tasks get only
/// their own lease handle and the [`ShardSettings`]; this is for the
/// connection's reader and writer, the watchdog and shutdown.
pub(crate) struct Agent {
    config: AgentConfig,
    id: Uuid,
    capabilities: Capabilities,
    shards: Arc<ShardSettings>,
    leases: Leases,
    contact: Contact,
    /// From the latest Welcome.
    limits: Mutex<Limits>,
    /// Shutting down: hand every lease back, take none.
    stopping: CancellationToken,
    tasks: TaskTracker,
    /// The daemon's span (`agent_id`): parent of every session and shard.
    span: tracing::Span,
}

impl Agent {
    fn limits(&self) -> Limits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_limits(&self, limits: Limits) {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner()) = limits;
    }

    fn is_stopping(&self) -> bool {
        self.stopping.is_cancelled()
    }

    /// Shutting down and nothing left to hand back.
    fn is_done(&self) -> bool {
        self.is_stopping() && self.leases.is_empty()
    }
}

/// Runs the daemon until `shutdown`; then hands shards back and exits.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), SessionError> {
    let id = state::agent_id(&config.state_dir, &config.name)?;
    let endpoint = Endpoint::from_shared(config.controller.clone())
        .map_err(|e| SessionError::BadController(config.controller.clone(), e.to_string()))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true);
    if config.tls.is_none() && config.controller.starts_with("https://") {
        return Err(SessionError::BadController(
            config.controller.clone(),
            "an https:// controller needs --ca (the CA that signed its certificate)".into(),
        ));
    }
    // Shared with the renewal task: each connection uses the newest
    // certificate.
    let tls = Arc::new(Mutex::new(config.tls.clone()));
    with_tls(&config.controller, endpoint.clone(), &tls)?;
    let raw_socket = crate::net::has_raw_privilege();
    let span = tracing::info_span!("agent", agent_id = %id);
    let ipv6 = ipv6_capability(&config.net).instrument(span.clone()).await;
    let agent = Arc::new(Agent {
        capabilities: Capabilities { raw_socket, ipv6 },
        shards: Arc::new(ShardSettings {
            wait: config.wait,
            net: config.net.clone(),
            deny: Arc::new(config.policy.denied()),
            policy: config.policy.clone(),
            raw_socket,
            max_rate: config.max_rate,
            max_shards: config.max_shards,
            identifier: config.identifier.clone(),
        }),
        id,
        leases: Leases::default(),
        contact: Contact::new(),
        limits: Mutex::new(Limits::default()),
        stopping: CancellationToken::new(),
        tasks: TaskTracker::new(),
        span: span.clone(),
        config,
    });
    serve(agent, endpoint, tls, shutdown).instrument(span).await
}

/// Whether to offer IPv6: only with a route to global IPv6 space and an
/// address to send from (binding `[::1]` proves nothing), logged once.
/// The controller then places IPv6 shards on this agent.
async fn ipv6_capability(net: &NetOptions) -> bool {
    let net = net.clone();
    let reach = match tokio::task::spawn_blocking(move || crate::net::ipv6_reach(&net)).await {
        Ok(reach) => reach,
        Err(e) => crate::net::route::Ipv6Reach::Unknown { reason: format!("route check failed: {e}") },
    };
    let ipv6 = reach.is_reachable();
    tracing::info!(ipv6, detail = %reach, "ipv6 capability");
    ipv6
}

/// The endpoint with the current TLS settings.
fn with_tls(controller: &str, endpoint: Endpoint, tls: &Mutex<Option<ClientTls>>) -> Result<Endpoint, SessionError> {
    match tls.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
        Some(t) => endpoint
            .tls_config(t.config())
            .map_err(|e| SessionError::BadController(controller.to_string(), format!("TLS: {e}"))),
        None => Ok(endpoint),
    }
}

/// Starts the daemon's tasks, reconnects until done, then stops them.
///
/// Shutdown, in order: `shutdown` asks every shard task to hand its lease
/// back (checkpoint, then ShardReleased), new Assigns are handed straight
/// back, and a pending reconnect is not waited out; the daemon exits once
/// every lease is out and acked (at once when it holds none), or after
/// `shutdown_timeout` (the leases then lapse on the controller). Leases
/// still in hand are then dropped (their engines stop within
/// milliseconds), and every task is awaited for up to a second.
async fn serve(
    agent: Arc<Agent>,
    endpoint: Endpoint,
    tls: Arc<Mutex<Option<ClientTls>>>,
    shutdown: CancellationToken,
) -> Result<(), SessionError> {
    // Ends the watchdog and the shutdown timer when the daemon returns;
    // renewal stops at shutdown already.
    let done = CancellationToken::new();
    let renewal_stop = shutdown.child_token();
    // Hand-back time is over.
    let give_up = CancellationToken::new();
    if agent.config.tls.as_ref().is_some_and(|t| t.renew.is_some()) {
        agent.tasks.spawn(renew::run(endpoint.clone(), tls.clone(), renewal_stop.clone()).in_current_span());
    }
    agent.tasks.spawn({
        let (agent, done) = (agent.clone(), done.clone());
        async move { contact::watchdog(&agent.contact, &agent.leases, done).await }.in_current_span()
    });
    agent.tasks.spawn(hand_back_on(shutdown, agent.clone(), give_up.clone(), done.clone()).in_current_span());
    agent.tasks.spawn({
        let (agent, done) = (agent.clone(), done.clone());
        async move { crate::metrics::sample(|| agent.leases.gauges(), done).await }
    });
    tracing::info!(name = %agent.config.name, raw_socket = agent.capabilities.raw_socket, "agent starting");
    let result = reconnect(&agent, &endpoint, &tls, &give_up).await;
    done.cancel();
    renewal_stop.cancel();
    agent.leases.drop_all();
    agent.tasks.close();
    if tokio::time::timeout(TASKS_STOP_WITHIN, agent.tasks.wait()).await.is_err() {
        tracing::warn!(tasks = agent.tasks.len(), "some agent tasks did not stop in time");
    }
    result
}

/// Waits for `shutdown`, then asks every lease back and, after the
/// configured timeout, cancels `give_up`.
async fn hand_back_on(
    shutdown: CancellationToken,
    agent: Arc<Agent>,
    give_up: CancellationToken,
    done: CancellationToken,
) {
    tokio::select! {
        _ = done.cancelled() => return,
        _ = shutdown.cancelled() => {}
    }
    tracing::info!("shutting down: handing shards back");
    agent.stopping.cancel();
    agent.leases.release_all();
    tokio::select! {
        _ = done.cancelled() => {}
        _ = tokio::time::sleep(agent.config.shutdown_timeout) => give_up.cancel(),
    }
}

/// One connection after another until shutdown is over.
async fn reconnect(
    agent: &Arc<Agent>,
    endpoint: &Endpoint,
    tls: &Mutex<Option<ClientTls>>,
    give_up: &CancellationToken,
) -> Result<(), SessionError> {
    let mut backoff = Backoff::new(RECONNECT_FIRST, RECONNECT_MAX);
    let mut ends = EndLog::default();
    loop {
        if agent.is_done() {
            tracing::info!("all shards handed back; exiting");
            return Ok(());
        }
        let endpoint = with_tls(&agent.config.controller, endpoint.clone(), tls)?;
        let span = tracing::info_span!("session", generation = tracing::field::Empty);
        let (end, news) = async {
            let end = connection::run(agent, endpoint, give_up).await;
            let news = ends.log(&end, &agent.config.controller);
            (end, news)
        }
        .instrument(span)
        .await;
        if end.is_final() || agent.is_done() {
            return Ok(());
        }
        if end.was_established() {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if news {
            tracing::info!(retry_in_ms, "reconnecting");
        } else {
            tracing::debug!(retry_in_ms, "reconnecting");
        }
        tokio::select! {
            _ = give_up.cancelled() => {
                SessionEnd::GaveUp.log(&agent.config.controller);
                return Ok(());
            }
            // Shutdown began: exit, or go hand the leases back, now.
            _ = agent.stopping.cancelled(), if !agent.is_stopping() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The outage: the controller away for 34 s. Whenever it
    /// returns, the agent's next attempt is at most the cap away (it came
    /// back 21 s late with a 30 s cap).
    #[test]
    fn after_any_outage_the_agent_tries_again_within_the_cap() {
        assert!(RECONNECT_MAX <= Duration::from_secs(5), "rejoining takes a few seconds at most");
        for _ in 0..200 {
            let mut backoff = Backoff::new(RECONNECT_FIRST, RECONNECT_MAX);
            let outage = Duration::from_secs(34);
            let mut at = Duration::ZERO;
            while at < outage {
                let delay = backoff.next_delay();
                assert!(delay <= RECONNECT_MAX, "{delay:?}");
                at += delay;
            }
            assert!(at - outage <= RECONNECT_MAX, "tried again {:?} after the return", at - outage);
        }
    }
}
