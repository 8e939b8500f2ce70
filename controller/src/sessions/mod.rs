//! `AgentService.Session`: the controller's side of the agent protocol
//! (docs/protocol.md). One task per stream: handshake, then frames applied
//! in order, each in its own fenced transaction and acked after commit.
//! Problems inside a live stream travel as `Refused` frames; a `Status`
//! only refuses a handshake or ends a session.

pub mod registry;

use std::{collections::HashMap, net::IpAddr, pin::Pin, sync::Arc};

use chrono::{DateTime, Utc};
use futures::Stream;
use portfleet_core::{AddressSet, PortSet, ScanSpace, labels, permutation::Permutation, text};
use portfleet_proto::{
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
    v1::{
        self as pb, agent_message::Frame as In, agent_service_server::AgentService, controller_message::Frame as Out,
    },
};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

pub use self::registry::{LeaseInfo, Registry};
use self::registry::{NewSession, Outbound};
use crate::{
    config::FleetConfig,
    notify::{Notice, Notifier},
    store::{AgentClass, AgentIntro, Applied, Beat, FailOutcome, Fence, PortRecord, ShardProgress, Store, StoreError},
};

/// What sessions and the scheduler share.
#[derive(Debug)]
pub struct Fleet {
    pub store: Store,
    pub registry: Registry,
    /// Index spaces of scans with results coming in: the controller maps
    /// every reported (ip, port) to its position (and so proves it belongs
    /// to the scan).
    pub spaces: std::sync::Mutex<HashMap<Uuid, Arc<ScanSpace>>>,
    pub config: FleetConfig,
    pub notifier: Notifier,
    /// Wakes the scheduler (capacity freed, agent connected).
    pub wake: Notify,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    /// Signs enrolling agents' certificates, when configured.
    pub agent_ca: Option<Arc<crate::enroll::AgentCa>>,
}

#[derive(Clone, Debug)]
pub struct AgentApi {
    fleet: Arc<Fleet>,
}

impl AgentApi {
    pub fn new(fleet: Arc<Fleet>) -> Self {
        Self { fleet }
    }
}

impl Fleet {
    /// The index space of a scan, built once from its stored plan.
    pub async fn space(&self, scan_id: Uuid) -> Result<Option<Arc<ScanSpace>>, StoreError> {
        if let Some(s) = self.spaces.lock().unwrap_or_else(|p| p.into_inner()).get(&scan_id) {
            return Ok(Some(s.clone()));
        }
        let Some(p) = self.store.scan_params(scan_id).await? else { return Ok(None) };
        let corrupt = |e: portfleet_core::SpecError| StoreError::Corrupt(format!("scan {scan_id}: {e}"));
        let addrs = AddressSet::parse_ranges(&p.address_ranges).map_err(corrupt)?;
        let ports = PortSet::parse(&p.ports).map_err(corrupt)?;
        let space = Arc::new(ScanSpace::new(addrs, ports, p.seed as u64, Permutation::MAX_LEN).map_err(corrupt)?);
        let mut spaces = self.spaces.lock().unwrap_or_else(|p| p.into_inner());
        if spaces.len() >= 256 {
            spaces.clear();
        }
        spaces.insert(scan_id, space.clone());
        Ok(Some(space))
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<pb::ControllerMessage, Status>> + Send>>;

impl AgentApi {
    /// The agent the caller's client certificate names, if it is not
    /// revoked. The TLS handshake already verified the chain.
    async fn certified_agent<T>(&self, request: &Request<T>) -> Result<Uuid, Status> {
        let certs = request.peer_certs().filter(|c| !c.is_empty()).ok_or_else(|| {
            Status::unauthenticated("agents must present a client certificate issued by the controller's CA")
        })?;
        let id = crate::enroll::agent_of(certs[0].as_ref())
            .ok_or_else(|| Status::unauthenticated("the client certificate names no agent id"))?;
        if self.fleet.store.is_agent_revoked(id).await.map_err(unavailable)? {
            tracing::warn!(agent_id = %id, "a revoked agent tried to connect");
            return Err(Status::permission_denied(format!("agent {id} is revoked")));
        }
        Ok(id)
    }
}

#[tonic::async_trait]
impl AgentService for AgentApi {
    type SessionStream = SessionStream;

    async fn session(&self, request: Request<Streaming<pb::AgentMessage>>) -> Result<Response<SessionStream>, Status> {
        // With mTLS the handshake verified the chain; an agent without a
        // certificate (an operator's client, a token) gets nothing here.
        let identity =
            if self.fleet.config.require_client_cert { Some(self.certified_agent(&request).await?) } else { None };
        let inbound = request.into_inner();
        // Bounded: a slow agent slows its own session, nothing else.
        let (tx, rx) = mpsc::channel(256);
        let fleet = self.fleet.clone();
        self.fleet.tracker.spawn(async move { Session::run(fleet, inbound, tx, identity).await });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn renew(&self, request: Request<pb::RenewRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let Some(ca) = &self.fleet.agent_ca else {
            return Err(Status::failed_precondition("this controller does not sign certificates"));
        };
        let agent_id = self.certified_agent(&request).await?;
        let r = request.into_inner();
        let (certificate_pem, expires) = ca.sign(&r.csr_pem, agent_id).map_err(|e| match e {
            crate::enroll::EnrollError::BadRequest(_) => Status::invalid_argument(e.to_string()),
            other => {
                tracing::error!(error = %other, "cannot sign an agent certificate");
                Status::internal("the controller cannot sign certificates")
            }
        })?;
        tracing::info!(%agent_id, %expires, "agent certificate renewed");
        Ok(Response::new(pb::EnrollResponse {
            agent_id: agent_id.to_string(),
            certificate_pem,
            ca_pem: ca.pem().to_string(),
            expires_at: Some(prost_types::Timestamp { seconds: expires.timestamp(), nanos: 0 }),
            labels: Default::default(),
        }))
    }

    async fn enroll(&self, request: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        use crate::enroll::EnrollError;
        let Some(ca) = &self.fleet.agent_ca else {
            return Err(Status::failed_precondition(
                "this controller does not enroll agents (serve --tls-client-ca-key)",
            ));
        };
        let r = request.into_inner();
        if r.token.len() > 256 {
            return Err(Status::invalid_argument("token: too long"));
        }
        text::check(&r.name, 128).map_err(|e| Status::invalid_argument(format!("name: {e}")))?;
        let agent_id = Uuid::new_v4();
        let status = |e: EnrollError| match e {
            EnrollError::BadToken => Status::permission_denied(e.to_string()),
            EnrollError::BadRequest(_) => Status::invalid_argument(e.to_string()),
            EnrollError::Store(s) => unavailable(s),
            EnrollError::Ca(m) => {
                tracing::error!(error = %m, "cannot sign an agent certificate");
                Status::internal("the controller cannot sign certificates")
            }
        };
        // Sign first: a bad request must not burn the token.
        let (certificate_pem, expires) = ca.sign(&r.csr_pem, agent_id).map_err(status)?;
        let labels = crate::enroll::redeem(&self.fleet.store, &r.token, agent_id).await.map_err(|e| {
            tracing::warn!(name = %r.name, "enrollment refused: {e}");
            status(e)
        })?;
        tracing::info!(%agent_id, name = %r.name, %expires, "agent enrolled");
        Ok(Response::new(pb::EnrollResponse {
            agent_id: agent_id.to_string(),
            certificate_pem,
            ca_pem: ca.pem().to_string(),
            expires_at: Some(prost_types::Timestamp { seconds: expires.timestamp(), nanos: 0 }),
            labels: labels.into_iter().collect(),
        }))
    }
}

/// A validated Hello.
struct Hello {
    intro: AgentIntro,
    version: u32,
    held: Vec<(i64, i64)>,
}

fn frame(f: Out) -> pb::ControllerMessage {
    pb::ControllerMessage { frame: Some(f) }
}

impl Hello {
    fn parse(h: pb::Hello) -> Result<Self, Status> {
        let bad = |m: String| Status::invalid_argument(format!("hello.{m}"));
        let id = Uuid::try_parse(&h.agent_id).map_err(|_| bad(format!("agent_id: {:?} is not a UUID", h.agent_id)))?;
        if h.name.is_empty() {
            return Err(bad("name: give 1 to 128 bytes".into()));
        }
        text::check(&h.name, 128).map_err(|e| bad(format!("name: {e}")))?;
        text::check(&h.version, 64).map_err(|e| bad(format!("version: {e}")))?;
        labels::check_all(&h.labels).map_err(|e| bad(format!("labels: {e}")))?;
        let (lo, hi) = (h.min_protocol_version, h.max_protocol_version);
        let version = hi.min(PROTOCOL_VERSION_MAX);
        if lo > hi || version < lo.max(PROTOCOL_VERSION_MIN) {
            return Err(Status::failed_precondition(format!(
                "protocol versions: the agent speaks {lo}..={hi}, this controller {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX}"
            )));
        }
        if h.held.len() > 1024 {
            return Err(bad("held: more than 1024 leases".into()));
        }
        let caps = h.capabilities.unwrap_or_default();
        Ok(Self {
            intro: AgentIntro {
                id,
                name: h.name,
                version: h.version,
                labels: h.labels.into_iter().collect(),
                raw_socket: caps.raw_socket,
                ipv6: caps.ipv6,
                max_rate: h.max_rate.min(i32::MAX as u32) as i32,
                max_shards: h.max_shards.clamp(1, 64) as i32,
            },
            version,
            held: h.held.iter().map(|l| (l.shard_id as i64, l.lease_epoch as i64)).collect(),
        })
    }
}

struct Session {
    fleet: Arc<Fleet>,
    agent_id: Uuid,
    generation: i64,
    tx: Outbound,
}

fn unavailable(e: StoreError) -> Status {
    crate::api::store_status(e)
}

impl Session {
    /// `identity`: the agent id its certificate names (mTLS), which its
    /// Hello must claim.
    async fn run(fleet: Arc<Fleet>, mut inbound: Streaming<pb::AgentMessage>, tx: Outbound, identity: Option<Uuid>) {
        let hello = tokio::select! {
            _ = fleet.shutdown.cancelled() => return,
            h = Self::handshake(&fleet, &mut inbound) => h,
        };
        let hello = hello.and_then(|h| match identity {
            Some(id) if id != h.intro.id => Err(Status::permission_denied(format!(
                "Hello claims agent {} but the certificate is agent {id}",
                h.intro.id
            ))),
            _ => Ok(h),
        });
        let hello = match hello {
            Ok(h) => h,
            Err(status) => {
                tracing::info!(code = ?status.code(), message = status.message(), "agent handshake refused");
                let _ = tx.send(Err(status)).await;
                return;
            }
        };
        let Some(session) = Self::open(&fleet, hello, tx.clone()).await else { return };
        let span = tracing::info_span!("session", agent_id = %session.agent_id, generation = session.generation);
        let _ = tracing::Instrument::instrument(session.serve(inbound), span).await;
    }

    async fn handshake(fleet: &Fleet, inbound: &mut Streaming<pb::AgentMessage>) -> Result<Hello, Status> {
        let timeout = fleet.config.hello_timeout;
        let first = tokio::time::timeout(timeout, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded(format!("no Hello within {timeout:?}")))??;
        match first.and_then(|m| m.frame) {
            Some(In::Hello(h)) => Hello::parse(h),
            Some(_) => Err(Status::invalid_argument("the first frame must be Hello")),
            None => Err(Status::cancelled("stream ended before Hello")),
        }
    }

    /// Records the session, resumes held leases, sends Welcome.
    async fn open(fleet: &Arc<Fleet>, hello: Hello, tx: Outbound) -> Option<Session> {
        let cfg = &fleet.config;
        let agent_id = hello.intro.id;
        let opened = async {
            let generation = fleet.store.open_agent_session(&hello.intro, &cfg.controller_id).await?;
            let adopted = fleet.store.adopt_leases(agent_id, &cfg.controller_id, &hello.held, cfg.lease_ttl).await?;
            Ok::<_, StoreError>((generation, adopted))
        };
        let (generation, adopted) = match opened.await {
            Ok(v) => v,
            Err(e) => {
                let _ = tx.send(Err(unavailable(e))).await;
                return None;
            }
        };
        let revoked: Vec<pb::HeldLease> = hello
            .held
            .iter()
            .filter(|(id, epoch)| !adopted.iter().any(|a| a.id == *id && a.lease_epoch == *epoch))
            .map(|(id, epoch)| pb::HeldLease { shard_id: *id as u64, lease_epoch: *epoch as u64 })
            .collect();
        let welcome = pb::Welcome {
            protocol_version: hello.version,
            session_generation: generation as u64,
            heartbeat_interval_ms: cfg.heartbeat_interval.as_millis() as u32,
            limits: Some(pb::Limits {
                max_batch_results: cfg.max_batch_results,
                max_unacked_frames: cfg.max_unacked_frames,
                lease_ttl_ms: cfg.lease_ttl.as_millis() as u32,
                disconnect_grace_ms: cfg.disconnect_grace.as_millis() as u32,
            }),
            controller_id: cfg.controller_id.clone(),
            revoked,
        };
        if tx.send(Ok(frame(Out::Welcome(welcome)))).await.is_err() {
            return None;
        }
        let closer = CancellationToken::new();
        let leases: HashMap<i64, LeaseInfo> = adopted
            .iter()
            .map(|a| (a.id, LeaseInfo { lease_epoch: a.lease_epoch, scan_id: a.scan_id, rate: 0 }))
            .collect();
        fleet.registry.insert(NewSession {
            agent_id,
            generation,
            tx: tx.clone(),
            class: AgentClass {
                raw_socket: hello.intro.raw_socket,
                ipv6: hello.intro.ipv6,
                labels: hello.intro.labels,
            },
            max_shards: hello.intro.max_shards as u32,
            max_rate: hello.intro.max_rate as u32,
            leases,
            closer,
        });
        tracing::info!(%agent_id, name = %hello.intro.name, generation, resumed = adopted.len(), "agent connected");
        fleet.wake.notify_one();
        Some(Session { fleet: fleet.clone(), agent_id, generation, tx })
    }

    async fn serve(self, mut inbound: Streaming<pb::AgentMessage>) {
        let fleet = self.fleet.clone();
        let closer = fleet.registry.closer(self.agent_id).unwrap_or_default();
        let ttl = fleet.config.lease_ttl;
        let mut deadline = tokio::time::Instant::now() + ttl;
        let end: Option<Status> = loop {
            let msg = tokio::select! {
                _ = fleet.shutdown.cancelled() => break Some(Status::unavailable("controller shutting down")),
                _ = closer.cancelled() => break Some(Status::aborted("session closed: superseded by a newer session or revoked")),
                _ = tokio::time::sleep_until(deadline) => {
                    break Some(Status::deadline_exceeded(format!("no heartbeat within {ttl:?}")));
                }
                msg = inbound.message() => msg,
            };
            match msg {
                Ok(Some(pb::AgentMessage { frame: Some(f) })) => {
                    if matches!(f, In::Heartbeat(_)) {
                        deadline = tokio::time::Instant::now() + ttl;
                    }
                    if let Err(status) = self.handle(f).await {
                        break Some(status);
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break None,
                Err(status) => {
                    tracing::debug!(code = ?status.code(), "agent stream failed");
                    break None;
                }
            }
        };
        if let Some(status) = end {
            tracing::info!(code = ?status.code(), message = status.message(), "ending agent session");
            let _ = self.tx.try_send(Err(status));
        }
        fleet.registry.remove(self.agent_id, self.generation);
        // The leases lapse after a grace period unless the agent returns.
        if let Err(e) = fleet.store.shorten_leases(self.agent_id, fleet.config.disconnect_grace).await {
            tracing::warn!(error = %e, "could not shorten the leases of a departed agent");
        }
        let _ = fleet.store.set_agent_state(self.agent_id, self.generation, "gone").await;
        tracing::info!("agent disconnected");
        fleet.wake.notify_one();
    }

    async fn send(&self, f: Out) -> Result<(), Status> {
        self.tx.send(Ok(frame(f))).await.map_err(|_| Status::cancelled("agent stream closed"))
    }

    async fn refuse(
        &self,
        shard_id: u64,
        epoch: u64,
        seq: u64,
        reason: pb::RefusalReason,
        message: String,
    ) -> Result<(), Status> {
        tracing::info!(shard_id, epoch, seq, ?reason, %message, "frame refused");
        self.send(Out::Refused(pb::Refused { shard_id, lease_epoch: epoch, seq, reason: reason as i32, message })).await
    }

    fn fence(&self, shard_id: u64, epoch: u64, seq: u64) -> Result<Fence, String> {
        let conv = |v: u64, what: &str| i64::try_from(v).map_err(|_| format!("{what} out of range"));
        if seq == 0 {
            return Err("seq starts at 1".into());
        }
        Ok(Fence {
            shard_id: conv(shard_id, "shard_id")?,
            lease_epoch: conv(epoch, "lease_epoch")?,
            agent_id: self.agent_id,
            seq: conv(seq, "seq")?,
        })
    }

    /// Acks a committed frame or refuses it; forgets leases that are gone.
    async fn answer(&self, f: &Fence, outcome: Applied) -> Result<(), Status> {
        let (shard, epoch, seq) = (f.shard_id as u64, f.lease_epoch as u64, f.seq as u64);
        match outcome {
            Applied::Done | Applied::Duplicate => {
                self.send(Out::Ack(pb::Ack { shard_id: shard, lease_epoch: epoch, seq })).await
            }
            Applied::Stale => {
                self.fleet.registry.remove_lease(self.agent_id, f.shard_id);
                self.refuse(shard, epoch, seq, pb::RefusalReason::StaleEpoch, "the lease is no longer held".into())
                    .await
            }
            Applied::NotHeld => {
                self.refuse(shard, epoch, seq, pb::RefusalReason::UnknownShard, "no such lease for this agent".into())
                    .await
            }
            Applied::OutOfOrder => {
                self.refuse(shard, epoch, seq, pb::RefusalReason::OutOfOrder, "a sequence number was skipped".into())
                    .await
            }
            Applied::OutsideLease { position, start, end } => {
                tracing::warn!(shard_id = shard, position, start, end, "agent reported a result outside its lease");
                let msg = format!("position {position} is outside the lease ({start}..{end}); nothing was written");
                self.refuse(shard, epoch, seq, pb::RefusalReason::Invalid, msg).await
            }
        }
    }

    async fn handle(&self, f: In) -> Result<(), Status> {
        let store = &self.fleet.store;
        match f {
            In::Hello(_) => self.refuse(0, 0, 0, pb::RefusalReason::Invalid, "Hello after the handshake".into()).await,
            In::Heartbeat(h) => {
                self.fleet.registry.record_beat(
                    Beat {
                        agent_id: self.agent_id,
                        generation: self.generation,
                        current_rate: h.current_rate.min(i32::MAX as u32) as i32,
                        active_shards: h.active_shards.min(i32::MAX as u32) as i32,
                    },
                    h.sent_at,
                );
                Ok(())
            }
            In::Results(b) => {
                let max = self.fleet.config.max_batch_results as usize;
                let Ok(fence) = self.fence(b.shard_id, b.lease_epoch, b.seq) else {
                    return self
                        .refuse(b.shard_id, b.lease_epoch, b.seq, pb::RefusalReason::Invalid, "bad ids".into())
                        .await;
                };
                if b.results.len() > max {
                    let msg = format!("{} results exceed the maximum of {max} per batch", b.results.len());
                    return self.refuse(b.shard_id, b.lease_epoch, b.seq, pb::RefusalReason::BatchTooLarge, msg).await;
                }
                let scan = match self.fleet.registry.lease_scan(self.agent_id, fence.shard_id) {
                    Some(scan) => Some(scan),
                    None => store.shard_scan(fence.shard_id).await.map_err(unavailable)?,
                };
                let space = match scan {
                    Some(scan) => self.fleet.space(scan).await.map_err(unavailable)?,
                    None => None,
                };
                let Some(space) = space else {
                    return self.answer(&fence, Applied::NotHeld).await;
                };
                let parsed = b.results.into_iter().map(|r| port_record(r, &space)).collect::<Result<Vec<_>, String>>();
                let mut rows = match parsed {
                    Ok(rows) => rows,
                    Err(msg) => {
                        return self.refuse(b.shard_id, b.lease_epoch, b.seq, pb::RefusalReason::Invalid, msg).await;
                    }
                };
                // One statement may not touch a row twice.
                rows.sort_unstable();
                rows.dedup_by_key(|r| r.position);
                let outcome = store.apply_results(&fence, &rows).await.map_err(unavailable)?;
                self.answer(&fence, outcome).await
            }
            In::Progress(p) => {
                let Ok(fence) = self.fence(p.shard_id, p.lease_epoch, p.seq) else {
                    return self
                        .refuse(p.shard_id, p.lease_epoch, p.seq, pb::RefusalReason::Invalid, "bad ids".into())
                        .await;
                };
                let progress = progress(p.checkpoint, p.counts);
                let outcome = store.apply_progress(&fence, &progress).await.map_err(unavailable)?;
                self.answer(&fence, outcome).await
            }
            In::Complete(c) => {
                let Ok(fence) = self.fence(c.shard_id, c.lease_epoch, c.seq) else {
                    return self
                        .refuse(c.shard_id, c.lease_epoch, c.seq, pb::RefusalReason::Invalid, "bad ids".into())
                        .await;
                };
                let (outcome, completed) =
                    store.apply_complete(&fence, &progress(0, c.counts)).await.map_err(unavailable)?;
                if matches!(outcome, Applied::Done | Applied::Duplicate) {
                    self.fleet.registry.remove_lease(self.agent_id, fence.shard_id);
                    self.fleet.wake.notify_one();
                }
                if let Some(scan) = completed {
                    tracing::info!(scan_id = %scan, "scan completed");
                    self.fleet.notifier.local(Notice::ScanChanged(scan));
                }
                self.answer(&fence, outcome).await
            }
            In::Failed(fl) => {
                let (shard, epoch) = (fl.shard_id as i64, fl.lease_epoch as i64);
                let reason = text::sanitize(&fl.reason, 1000);
                tracing::warn!(shard_id = shard, %reason, "agent reports a failed shard");
                let outcome = store
                    .fail_shard(shard, epoch, self.agent_id, &reason, self.fleet.config.max_shard_failures)
                    .await
                    .map_err(unavailable)?;
                self.fleet.registry.remove_lease(self.agent_id, shard);
                self.fleet.wake.notify_one();
                if let FailOutcome::ScanFailed(scan) = outcome {
                    tracing::warn!(scan_id = %scan, "scan failed");
                    self.fleet.notifier.local(Notice::ScanChanged(scan));
                }
                Ok(())
            }
            In::Released(r) => {
                let (shard, epoch) = (r.shard_id as i64, r.lease_epoch as i64);
                if r.agent_leaving && self.fleet.registry.drain(self.agent_id).is_some() {
                    // Before the scheduler wakes: no new work for a leaver.
                    tracing::info!("agent is shutting down");
                    let _ = store.set_agent_state(self.agent_id, self.generation, "draining").await;
                }
                store.release_lease(shard, epoch, self.agent_id).await.map_err(unavailable)?;
                self.fleet.registry.remove_lease(self.agent_id, shard);
                self.fleet.wake.notify_one();
                Ok(())
            }
        }
    }
}

fn progress(checkpoint: u64, counts: Option<pb::ShardCounts>) -> ShardProgress {
    let c = counts.unwrap_or_default();
    let clamp = |v: u64| v.min(i64::MAX as u64) as i64;
    ShardProgress {
        checkpoint: clamp(checkpoint),
        sent: clamp(c.sent),
        open: clamp(c.open),
        closed: clamp(c.closed),
        filtered: clamp(c.filtered),
    }
}

/// Converts one wire result, validating it against the scan's space.
fn port_record(r: pb::PortResult, space: &ScanSpace) -> Result<PortRecord, String> {
    let ip = match r.ip.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(&r.ip[..]).map_err(|_| "bad ip")?),
        16 => IpAddr::from(<[u8; 16]>::try_from(&r.ip[..]).map_err(|_| "bad ip")?),
        n => return Err(format!("ip of {n} bytes (want 4 or 16)")),
    };
    if !(1..=65535).contains(&r.port) {
        return Err(format!("port {} outside 1-65535", r.port));
    }
    if r.state != pb::PortState::Open as i32 {
        return Err("only open ports are reported".into());
    }
    let position =
        space.position_of(ip, r.port as u16).ok_or_else(|| format!("{ip} port {} is not part of this scan", r.port))?;
    let observed_at = r
        .observed_at
        .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .unwrap_or_else(Utc::now);
    Ok(PortRecord { position: position as i64, ip, port: r.port as i32, observed_at })
}
