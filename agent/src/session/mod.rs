//! The agent daemon's side of `AgentService.Session` (docs/protocol.md).
//!
//! One connection at a time, re-opened forever with jittered exponential
//! backoff. Per connection a reader task applies what the controller says
//! (Assign starts a shard, Ack trims an outbox, Cancel stops a shard) and a
//! writer loop sends heartbeats and whatever the shards queued. Shards keep
//! scanning while the controller is away; their outboxes are bounded, and a
//! full outbox pauses the engine, so a slow or absent controller slows the
//! scan instead of piling results up.

pub mod outbox;
pub mod renew;
mod shard;

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use portfleet_proto::{
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
    v1::{
        self as pb, agent_message::Frame as Out, agent_service_client::AgentServiceClient,
        controller_message::Frame as In,
    },
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

use self::{outbox::Outbox, shard::StopMode};
use crate::{engine::LiveCounts, net::NetOptions};

/// Everything the daemon needs, whatever the source.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub controller: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
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
}

/// A lease this agent holds.
struct Slot {
    epoch: u64,
    outbox: Outbox,
    stop: CancellationToken,
    stop_mode: Arc<Mutex<StopMode>>,
    control: Arc<crate::engine::EngineControl>,
    counts: Arc<Mutex<Option<Arc<LiveCounts>>>>,
    /// The shard task has queued its last frame.
    finished: bool,
}

/// State shared by the connection tasks and the shard tasks.
pub(crate) struct Agent {
    config: AgentConfig,
    id: Uuid,
    raw_socket: bool,
    ipv6: bool,
    slots: Mutex<HashMap<u64, Slot>>,
    /// Something was queued for sending.
    outgoing: Notify,
    /// Room appeared in an outbox.
    room: Notify,
    draining: AtomicBool,
    stopping: AtomicBool,
    limits: Mutex<Limits>,
    contact: Mutex<Contact>,
    clock: Clock,
}

/// How fresh this agent's leases are known to be: the send time of the
/// latest heartbeat the controller echoed (it echoes only after extending
/// the leases, which it did after receiving that heartbeat), so a lease
/// lapses no sooner than `fresh + lapse`.
#[derive(Clone, Copy, Debug)]
struct Contact {
    fresh: Instant,
    /// `min(lease TTL, disconnect grace)` from the Welcome, less a margin.
    hold_after: Option<Duration>,
    /// This controller echoes heartbeats (older ones do not: no hold then).
    echoes: bool,
}

impl Contact {
    fn silent_too_long(&self) -> bool {
        self.echoes && self.hold_after.is_some_and(|d| self.fresh.elapsed() > d)
    }
}

#[derive(Clone, Copy, Debug)]
struct Limits {
    max_batch: usize,
    max_unacked: usize,
}

/// Heartbeat times on this agent's monotonic clock, as timestamps the
/// controller echoes back unchanged.
#[derive(Clone, Copy, Debug)]
struct Clock {
    wall: std::time::SystemTime,
    mono: Instant,
}

impl Clock {
    fn new() -> Self {
        Self { wall: std::time::SystemTime::now(), mono: Instant::now() }
    }

    fn stamp(&self, at: Instant) -> prost_types::Timestamp {
        let d = (self.wall + at.duration_since(self.mono)).duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
    }

    /// The instant a stamp of ours names; `None` for anything else.
    fn unstamp(&self, ts: &prost_types::Timestamp) -> Option<Instant> {
        let nanos = u32::try_from(ts.nanos).ok()?;
        let at = std::time::UNIX_EPOCH + Duration::new(u64::try_from(ts.seconds).ok()?, nanos);
        let since = at.duration_since(self.wall).ok()?;
        let at = self.mono.checked_add(since)?;
        (at <= Instant::now()).then_some(at)
    }
}

impl Agent {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn limits(&self) -> Limits {
        *self.limits.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn contact(&self) -> std::sync::MutexGuard<'_, Contact> {
        self.contact.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The controller extended this agent's leases after `at`.
    fn fresh_as_of(&self, at: Instant) {
        let mut c = self.contact();
        c.fresh = c.fresh.max(at);
    }

    /// Queues a sequenced frame for `shard`, waiting while its outbox is
    /// full (pausing the engine meanwhile). Returns false if the lease is
    /// gone.
    async fn push(
        &self,
        shard: u64,
        control: &crate::engine::EngineControl,
        build: impl FnOnce(u64) -> pb::AgentMessage,
    ) -> bool {
        let mut build = Some(build);
        loop {
            let room = self.room.notified();
            {
                let mut slots = self.lock();
                let Some(slot) = slots.get_mut(&shard) else { return false };
                if slot.outbox.has_room() {
                    if let Some(b) = build.take() {
                        slot.outbox.push_seq(b);
                    }
                    control.set_paused(false);
                    drop(slots);
                    self.outgoing.notify_one();
                    return true;
                }
            }
            control.set_paused(true);
            room.await;
        }
    }

    /// Queues the lease's last, un-acked frame.
    fn push_final(&self, shard: u64, msg: pb::AgentMessage) {
        let mut slots = self.lock();
        if let Some(slot) = slots.get_mut(&shard) {
            slot.outbox.push_final(msg);
            slot.finished = true;
        }
        drop(slots);
        self.outgoing.notify_one();
    }

    /// Forgets leases whose work is over and whose frames are all out.
    fn reap(&self) {
        self.lock().retain(|_, s| !(s.finished && s.outbox.is_empty()));
    }

    fn held(&self) -> Vec<pb::HeldLease> {
        self.lock().iter().map(|(id, s)| pb::HeldLease { shard_id: *id, lease_epoch: s.epoch }).collect()
    }

    fn stop_slot(&self, shard: u64, mode: StopMode) {
        let mut slots = self.lock();
        if let Some(slot) = slots.get_mut(&shard) {
            *slot.stop_mode.lock().unwrap_or_else(|p| p.into_inner()) = mode;
            slot.stop.cancel();
            if mode == StopMode::Drop {
                slots.remove(&shard);
            }
        }
        drop(slots);
        self.room.notify_waiters();
    }
}

/// Loads this agent's id from its state file, or creates one. The file
/// name includes the agent's name, so several agents on one host are
/// distinct.
/// A state file of the agent named `name`: `agent-<name>.<ext>`.
pub fn state_path(dir: &std::path::Path, name: &str, ext: &str) -> PathBuf {
    let safe: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect();
    dir.join(format!("agent-{safe}.{ext}"))
}

fn agent_id(dir: &std::path::Path, name: &str) -> Result<Uuid, SessionError> {
    let path = state_path(dir, name, "id");
    let err = |source| SessionError::State { path: path.clone(), source };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            Uuid::try_parse(text.trim()).map_err(|e| err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(err)?;
            let id = Uuid::new_v4();
            std::fs::write(&path, format!("{id}\n")).map_err(err)?;
            Ok(id)
        }
        Err(e) => Err(err(e)),
    }
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

/// Runs the daemon until `shutdown`; then hands shards back and exits.
pub async fn run(config: AgentConfig, shutdown: CancellationToken) -> Result<(), SessionError> {
    let id = agent_id(&config.state_dir, &config.name)?;
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
    let controller = config.controller.clone();
    let with_tls = move |endpoint: Endpoint, tls: &Mutex<Option<ClientTls>>| -> Result<Endpoint, SessionError> {
        match tls.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            Some(t) => endpoint
                .tls_config(t.config())
                .map_err(|e| SessionError::BadController(controller.clone(), format!("TLS: {e}"))),
            None => Ok(endpoint),
        }
    };
    with_tls(endpoint.clone(), &tls)?;
    if config.tls.as_ref().is_some_and(|t| t.renew.is_some()) {
        tokio::spawn(renew::run(endpoint.clone(), tls.clone(), shutdown.clone()));
    }
    let agent = Arc::new(Agent {
        raw_socket: crate::net::has_raw_privilege(),
        ipv6: std::net::UdpSocket::bind("[::1]:0").is_ok(),
        id,
        slots: Mutex::new(HashMap::new()),
        outgoing: Notify::new(),
        room: Notify::new(),
        draining: AtomicBool::new(false),
        stopping: AtomicBool::new(false),
        limits: Mutex::new(Limits { max_batch: 1000, max_unacked: 64 }),
        contact: Mutex::new(Contact { fresh: Instant::now(), hold_after: None, echoes: false }),
        clock: Clock::new(),
        config,
    });
    let _watchdog = {
        let done = CancellationToken::new();
        tokio::spawn(hold_while_silent(agent.clone(), done.clone()));
        done.drop_guard()
    };
    tracing::info!(agent_id = %id, name = %agent.config.name, raw_socket = agent.raw_socket, "agent starting");
    // After a shutdown request: hand back, flush, exit by this time.
    let give_up = CancellationToken::new();
    {
        let (agent, shutdown, give_up) = (agent.clone(), shutdown.clone(), give_up.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tracing::info!("shutting down: handing shards back");
            agent.stopping.store(true, Ordering::Relaxed);
            let ids: Vec<u64> = agent.lock().keys().copied().collect();
            for id in ids {
                agent.stop_slot(id, StopMode::Release);
            }
            tokio::time::sleep(agent.config.shutdown_timeout).await;
            give_up.cancel();
        });
    }
    let mut backoff = Backoff::new();
    loop {
        if agent.stopping.load(Ordering::Relaxed) && agent.lock().is_empty() {
            tracing::info!("all shards handed back; exiting");
            return Ok(());
        }
        let next = with_tls(endpoint.clone(), &tls)?;
        let connected = tokio::select! {
            _ = give_up.cancelled() => {
                tracing::warn!("could not hand every shard back in time; their leases will lapse");
                return Ok(());
            }
            c = next.connect() => c,
        };
        match connected {
            Ok(channel) => match connection(&agent, channel, &give_up).await {
                Ok(()) => backoff.reset(),
                Err(e) => tracing::warn!(error = %e, "session ended"),
            },
            Err(e) => tracing::warn!(controller = %agent.config.controller, error = %e, "cannot reach the controller"),
        }
        if agent.stopping.load(Ordering::Relaxed) && agent.lock().is_empty() {
            return Ok(());
        }
        let delay = backoff.next();
        tracing::info!(retry_in = ?delay, "reconnecting");
        tokio::select! {
            _ = give_up.cancelled() => return Ok(()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// Holds every shard's engine while the controller is silent for longer
/// than its leases are sure to last (a partition, a frozen controller), so
/// this agent never probes under a lease the fleet may have handed to
/// another agent; releases them when the controller is heard again (a
/// reconnect drops the leases that did lapse first).
async fn hold_while_silent(agent: Arc<Agent>, done: CancellationToken) {
    let mut held = false;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tick.tick() => {}
        }
        let contact = *agent.contact();
        let hold = contact.silent_too_long();
        let slots = agent.lock();
        if hold != held {
            held = hold;
            if hold {
                tracing::warn!(silent_for = ?contact.fresh.elapsed(), shards = slots.len(),
                    "no word from the controller: holding probes until it answers (leases may have lapsed)");
            } else {
                tracing::info!("controller heard again: probing resumes");
            }
        }
        for slot in slots.values() {
            slot.control.set_offline(hold);
        }
    }
}

/// Jittered exponential backoff, 100 ms to 30 s.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: Duration::from_millis(100) }
    }

    fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }

    fn next(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(30));
        base.mul_f64(rand::random_range(0.5..1.5))
    }
}

/// One session: handshake, then reader and writer until it breaks.
/// Returns Ok when a session was established (and later ended).
async fn connection(agent: &Arc<Agent>, channel: Channel, give_up: &CancellationToken) -> Result<(), String> {
    let mut client = AgentServiceClient::new(channel);
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
    let caps = pb::Capabilities { raw_socket: agent.raw_socket, ipv6: agent.ipv6 };
    let hello = pb::Hello {
        agent_id: agent.id.to_string(),
        name: agent.config.name.clone(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        min_protocol_version: PROTOCOL_VERSION_MIN,
        max_protocol_version: PROTOCOL_VERSION_MAX,
        capabilities: Some(caps),
        labels: agent.config.labels.clone().into_iter().collect(),
        max_rate: agent.config.max_rate,
        max_shards: agent.config.max_shards,
        held: agent.held(),
    };
    let hello_sent = Instant::now();
    tx.send(pb::AgentMessage { frame: Some(Out::Hello(hello)) }).await.map_err(|_| "stream closed")?;
    let mut inbound = client.session(ReceiverStream::new(rx)).await.map_err(|s| s.to_string())?.into_inner();
    let first = tokio::time::timeout(Duration::from_secs(15), inbound.message())
        .await
        .map_err(|_| "no Welcome from the controller".to_string())?
        .map_err(|s| format!("handshake refused: {} ({:?})", s.message(), s.code()))?;
    let Some(pb::ControllerMessage { frame: Some(In::Welcome(welcome)) }) = first else {
        return Err("the controller's first frame was not Welcome".into());
    };
    let limits = welcome.limits.unwrap_or_default();
    {
        let mut l = agent.limits.lock().unwrap_or_else(|p| p.into_inner());
        l.max_batch = (limits.max_batch_results as usize).clamp(1, 100_000);
        l.max_unacked = (limits.max_unacked_frames as usize).clamp(2, 10_000);
    }
    for r in &welcome.revoked {
        tracing::warn!(shard_id = r.shard_id, "lease lapsed while disconnected; dropping it");
        agent.stop_slot(r.shard_id, StopMode::Drop);
    }
    {
        // Leases lapse no sooner than the TTL after an extension, or the
        // grace after the session ends: hold probing a margin before the
        // shorter. Held leases were just extended (adopted) or revoked.
        let lapse = [limits.lease_ttl_ms, limits.disconnect_grace_ms].into_iter().filter(|&ms| ms > 0).min();
        let mut c = agent.contact();
        c.hold_after = lapse.map(|ms| {
            let lapse = Duration::from_millis(u64::from(ms));
            lapse.saturating_sub((lapse / 10).max(Duration::from_millis(250)))
        });
        c.echoes = limits.disconnect_grace_ms > 0;
        c.fresh = c.fresh.max(hello_sent);
    }
    {
        let max_unacked = agent.limits().max_unacked;
        let mut slots = agent.lock();
        for slot in slots.values_mut() {
            slot.outbox.set_capacity(max_unacked);
            slot.outbox.rewind();
        }
    }
    tracing::info!(controller_id = %welcome.controller_id, generation = welcome.session_generation, "session established");
    let broken = CancellationToken::new();
    let reader = tokio::spawn(read(agent.clone(), inbound, broken.clone()));
    let heartbeat = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms).clamp(100, 60_000));
    let result = write(agent, tx, heartbeat, &broken, give_up).await;
    broken.cancel();
    reader.abort();
    result
}

/// Sends heartbeats and queued frames until the connection breaks.
async fn write(
    agent: &Arc<Agent>,
    tx: mpsc::Sender<pb::AgentMessage>,
    heartbeat: Duration,
    broken: &CancellationToken,
    give_up: &CancellationToken,
) -> Result<(), String> {
    let mut tick = tokio::time::interval(heartbeat);
    let mut last_sent: HashMap<u64, u64> = HashMap::new();
    let mut last_beat = Instant::now();
    loop {
        let beat = tokio::select! {
            _ = broken.cancelled() => return Ok(()),
            _ = give_up.cancelled() => return Ok(()),
            _ = tick.tick() => true,
            _ = agent.outgoing.notified() => false,
        };
        if beat {
            let (rate, active) = current_rate(agent, &mut last_sent, last_beat.elapsed());
            last_beat = Instant::now();
            let hb = pb::Heartbeat {
                sent_at: Some(agent.clock.stamp(Instant::now())),
                current_rate: rate,
                active_shards: active,
            };
            send(&tx, broken, pb::AgentMessage { frame: Some(Out::Heartbeat(hb)) }).await?;
        }
        let pending: Vec<pb::AgentMessage> = {
            let mut slots = agent.lock();
            slots.values_mut().flat_map(|s| s.outbox.take_unsent()).collect()
        };
        for msg in pending {
            send(&tx, broken, msg).await?;
        }
        agent.reap();
        agent.room.notify_waiters();
        if agent.stopping.load(Ordering::Relaxed) && agent.lock().is_empty() {
            return Ok(());
        }
    }
}

async fn send(
    tx: &mpsc::Sender<pb::AgentMessage>,
    broken: &CancellationToken,
    msg: pb::AgentMessage,
) -> Result<(), String> {
    tokio::select! {
        _ = broken.cancelled() => Err("connection lost".into()),
        r = tx.send(msg) => r.map_err(|_| "connection lost".to_string()),
    }
}

/// Probes per second since the last heartbeat, and active shards.
fn current_rate(agent: &Agent, last: &mut HashMap<u64, u64>, elapsed: Duration) -> (u32, u32) {
    let slots = agent.lock();
    let mut delta = 0u64;
    for (id, slot) in slots.iter() {
        let counts = slot.counts.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(c) = counts {
            let sent = c.sent.load(Ordering::Relaxed);
            delta += sent.saturating_sub(*last.get(id).unwrap_or(&0));
            last.insert(*id, sent);
        }
    }
    last.retain(|id, _| slots.contains_key(id));
    let active = slots.values().filter(|s| !s.finished).count() as u32;
    ((delta as f64 / elapsed.as_secs_f64().max(0.001)) as u32, active)
}

/// Applies the controller's frames until the stream ends.
async fn read(agent: Arc<Agent>, mut inbound: tonic::Streaming<pb::ControllerMessage>, broken: CancellationToken) {
    loop {
        let msg = match inbound.message().await {
            Ok(Some(m)) => m,
            Ok(None) => {
                tracing::info!("controller closed the session");
                break;
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), "session stream ended");
                break;
            }
        };
        let Some(frame) = msg.frame else { continue };
        match frame {
            In::Assign(a) => shard::start(&agent, a),
            In::Ack(a) => {
                let mut slots = agent.lock();
                if let Some(slot) = slots.get_mut(&a.shard_id).filter(|s| s.epoch == a.lease_epoch) {
                    slot.outbox.ack(a.seq);
                }
                drop(slots);
                agent.reap();
                agent.room.notify_waiters();
            }
            In::Cancel(c) => {
                tracing::info!(shard_id = c.shard_id, reason = %c.reason, "shard cancelled by the controller");
                agent.stop_slot(c.shard_id, StopMode::Drop);
            }
            In::Rate(r) => {
                if let Some(slot) = agent.lock().get(&r.shard_id).filter(|s| s.epoch == r.lease_epoch) {
                    slot.control.set_rate(shard::capped(&agent, r.rate));
                }
            }
            In::Drain(_) => {
                tracing::info!("draining: finishing shards, taking no new ones");
                agent.draining.store(true, Ordering::Relaxed);
            }
            In::Refused(r) => {
                tracing::warn!(shard_id = r.shard_id, seq = r.seq, reason = r.reason, message = %r.message, "frame refused");
                let gone = [pb::RefusalReason::StaleEpoch as i32, pb::RefusalReason::UnknownShard as i32];
                if gone.contains(&r.reason) {
                    agent.stop_slot(r.shard_id, StopMode::Drop);
                }
            }
            In::Heartbeat(echo) => {
                if let Some(at) = echo.sent_at.as_ref().and_then(|t| agent.clock.unstamp(t)) {
                    agent.fresh_as_of(at);
                }
            }
            In::Welcome(_) => {}
        }
    }
    broken.cancel();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_stamps_come_back_as_the_same_instant() {
        let clock = Clock::new();
        let at = Instant::now();
        let back = clock.unstamp(&clock.stamp(at)).expect("our own stamp");
        let diff = if back > at { back - at } else { at - back };
        assert!(diff < Duration::from_micros(1), "{diff:?}");
        // Not ours: before the clock started, in the future, nonsense.
        assert_eq!(clock.unstamp(&prost_types::Timestamp { seconds: 1, nanos: 0 }), None);
        let future = clock.stamp(Instant::now() + Duration::from_secs(60));
        assert_eq!(clock.unstamp(&future), None);
        assert_eq!(clock.unstamp(&prost_types::Timestamp { seconds: -5, nanos: -1 }), None);
    }
}
