//! A live session: frames applied strictly in order, each in its own
//! fenced transaction and acked after commit; problems with a frame are
//! `Refused` frames and the session goes on. The session ends - with a
//! [`SessionEnd`] saying why - when the agent goes, falls silent past the
//! lease TTL, is superseded or revoked, the database fails, or the
//! controller stops.

use std::sync::Arc;

use portfleet_core::ScanSpace;
use portfleet_proto::v1 as pb;
use portfleet_telemetry::{otel, trace_span};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::{
    Fleet,
    handshake::Opened,
    registry::Outbound,
    wire::{BadFrame, FrameId, FromAgent, Refusal, Reported, ShardFailure, ToAgent},
};
use crate::{
    notify::Notice,
    store::{AgentState, Applied, Beat, FailOutcome, Fence, PortRecord, Retry, StoreError},
};

/// Why a session ended.
#[derive(Debug)]
pub enum SessionEnd {
    /// The agent closed its stream.
    AgentLeft,
    /// The stream failed under us (the connection dropped).
    StreamFailed(Status),
    /// No heartbeat within the lease TTL.
    Silent(std::time::Duration),
    /// A newer session of the agent, or a revocation, closed this one.
    Closed,
    /// The database failed while applying a frame.
    Store(StoreError),
    /// The agent stopped reading what we send.
    Unreachable,
    Shutdown,
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AgentLeft => f.write_str("the agent closed its stream"),
            Self::StreamFailed(s) => write!(f, "the stream failed: {}", s.message()),
            Self::Silent(ttl) => write!(f, "no heartbeat within {ttl:?}"),
            Self::Closed => f.write_str("superseded by a newer session, or revoked"),
            Self::Store(e) => write!(f, "database error: {e}"),
            Self::Unreachable => f.write_str("the agent stopped reading"),
            Self::Shutdown => f.write_str("the controller is shutting down"),
        }
    }
}

impl SessionEnd {
    /// The status the agent is told, when it can still be told.
    fn status(self) -> Option<Status> {
        Some(match self {
            Self::AgentLeft | Self::StreamFailed(_) | Self::Unreachable => return None,
            Self::Silent(ttl) => Status::deadline_exceeded(format!("no heartbeat within {ttl:?}")),
            Self::Closed => Status::aborted("session closed: superseded by a newer session or revoked"),
            Self::Store(e) => crate::api::store_status(e),
            Self::Shutdown => Status::unavailable("controller shutting down"),
        })
    }
}

/// One session's frame handling.
pub struct Session {
    pub fleet: Arc<Fleet>,
    pub opened: Opened,
    pub tx: Outbound,
}

impl Session {
    /// Serves frames until the session ends, then cleans up: the leases
    /// lapse after the disconnect grace unless the agent comes back.
    pub async fn serve(self, mut inbound: Streaming<pb::AgentMessage>, closer: CancellationToken) {
        let fleet = self.fleet.clone();
        let ttl = fleet.config.lease_ttl;
        let mut deadline = tokio::time::Instant::now() + ttl;
        let end = loop {
            let msg = tokio::select! {
                _ = fleet.shutdown.cancelled() => break SessionEnd::Shutdown,
                _ = closer.cancelled() => break SessionEnd::Closed,
                _ = tokio::time::sleep_until(deadline) => break SessionEnd::Silent(ttl),
                msg = inbound.message() => msg,
            };
            let frame = match msg {
                Ok(Some(pb::AgentMessage { frame: None })) => continue,
                Ok(Some(m)) => FromAgent::try_from(m),
                Ok(None) => break SessionEnd::AgentLeft,
                Err(status) => break SessionEnd::StreamFailed(status),
            };
            if matches!(frame, Ok(FromAgent::Heartbeat { .. })) {
                deadline = tokio::time::Instant::now() + ttl;
            }
            let handled = match frame {
                Ok(f) => self.handle(f).await,
                Err(bad) => self.refuse(bad).await,
            };
            if let Err(end) = handled {
                break end;
            }
        };
        let Opened { agent_id, generation, .. } = self.opened;
        match &end {
            SessionEnd::StreamFailed(status) => tracing::debug!(code = ?status.code(), "agent stream failed"),
            other => tracing::info!(reason = %other, "ending agent session"),
        }
        if let Some(status) = end.status() {
            let _ = self.tx.try_send(ToAgent::End(status));
        }
        fleet.registry.remove(agent_id, generation);
        if let Err(e) = fleet.store.shorten_leases(agent_id, fleet.config.disconnect_grace).await {
            tracing::warn!(error = %e, "could not shorten the leases of a departed agent");
        }
        let _ = fleet.store.set_agent_state(agent_id, generation, AgentState::Gone).await;
        tracing::info!("agent disconnected");
        fleet.wake.notify_one();
    }

    async fn send(&self, m: ToAgent) -> Result<(), SessionEnd> {
        self.tx.send(m).await.map_err(|_| SessionEnd::Unreachable)
    }

    async fn refuse(&self, bad: BadFrame) -> Result<(), SessionEnd> {
        tracing::info!(shard_id = bad.shard_id, epoch = bad.lease_epoch, seq = bad.seq, reason = ?bad.reason,
            message = %bad.message, "frame refused");
        self.send(ToAgent::Refused(bad)).await
    }

    async fn refuse_frame(&self, id: FrameId, reason: Refusal, message: String) -> Result<(), SessionEnd> {
        let (shard_id, lease_epoch, seq) = (id.shard_id.wire(), id.lease_epoch.wire(), id.seq.wire());
        self.refuse(BadFrame { shard_id, lease_epoch, seq, reason, message }).await
    }

    fn fence(&self, id: FrameId) -> Fence {
        Fence { shard_id: id.shard_id, lease_epoch: id.lease_epoch, agent_id: self.opened.agent_id, seq: id.seq }
    }

    /// Acks a committed frame or refuses it; forgets leases that are gone.
    async fn answer(&self, id: FrameId, outcome: Applied) -> Result<(), SessionEnd> {
        let agent_id = self.opened.agent_id;
        match outcome {
            Applied::Done | Applied::Duplicate => self.send(ToAgent::Ack(id)).await,
            Applied::Stale => {
                self.fleet.registry.remove_lease(agent_id, id.shard_id);
                self.refuse_frame(id, Refusal::StaleEpoch, "the lease is no longer held".into()).await
            }
            Applied::NotHeld => {
                self.refuse_frame(id, Refusal::UnknownShard, "no such lease for this agent".into()).await
            }
            Applied::OutOfOrder => {
                self.refuse_frame(id, Refusal::OutOfOrder, "a sequence number was skipped".into()).await
            }
            Applied::OutsideLease { position, start, end } => {
                tracing::warn!(shard_id = %id.shard_id, position, start, end, "agent reported a result outside its lease");
                let msg = format!("position {position} is outside the lease ({start}..{end}); nothing was written");
                self.refuse_frame(id, Refusal::Invalid, msg).await
            }
        }
    }

    /// The scan's space a lease's results are checked against; `None` for
    /// a shard this controller cannot place.
    async fn space_of(&self, id: FrameId) -> Result<Option<Arc<crate::plans::ScanPlan>>, StoreError> {
        let scan = match self.fleet.registry.lease_scan(self.opened.agent_id, id.shard_id) {
            Some(scan) => Some(scan),
            None => self.fleet.store.shard_scan(id.shard_id).await?,
        };
        match scan {
            Some(scan) => self.fleet.plans.get(scan).await,
            None => Ok(None),
        }
    }

    async fn handle(&self, f: FromAgent) -> Result<(), SessionEnd> {
        let store = &self.fleet.store;
        let Opened { agent_id, generation, .. } = self.opened;
        match f {
            FromAgent::Hello => {
                self.refuse(BadFrame {
                    shard_id: 0,
                    lease_epoch: 0,
                    seq: 0,
                    reason: Refusal::Invalid,
                    message: "Hello after the handshake".into(),
                })
                .await
            }
            FromAgent::Heartbeat { sent_at, current_rate, active_shards } => {
                let beat = Beat {
                    agent_id,
                    generation,
                    current_rate: i32::try_from(current_rate).unwrap_or(i32::MAX),
                    active_shards: i32::try_from(active_shards).unwrap_or(i32::MAX),
                };
                self.fleet.registry.record_beat(beat, sent_at);
                Ok(())
            }
            FromAgent::Results { id, results, count, trace_parent } => {
                // A span per batch (none per result), continuing the agent's
                // shard span: only when traces are exported.
                let span = trace_span!("ingest.result_batch", otel.kind = "consumer", agent_id = %agent_id,
                    shard_id = %id.shard_id, epoch = %id.lease_epoch, seq = %id.seq, results = count);
                otel::continue_trace(&span, trace_parent.as_ref());
                async {
                    let received = std::time::Instant::now();
                    let max = self.fleet.config.max_batch_results as usize;
                    if count > max {
                        let msg = format!("{count} results exceed the maximum of {max} per batch");
                        return self.refuse_frame(id, Refusal::BatchTooLarge, msg).await;
                    }
                    let Some(plan) = self.space_of(id).await.map_err(SessionEnd::Store)? else {
                        return self.answer(id, Applied::NotHeld).await;
                    };
                    let rows: Result<Vec<PortRecord>, String> =
                        results.and_then(|r| r.into_iter().map(|r| port_record(r, &plan.space)).collect());
                    let mut rows = match rows {
                        Ok(rows) => rows,
                        Err(msg) => return self.refuse_frame(id, Refusal::Invalid, msg).await,
                    };
                    // One statement may not touch a row twice.
                    rows.sort_unstable_by_key(|r| r.position);
                    rows.dedup_by_key(|r| r.position);
                    let outcome = store.apply_results(&self.fence(id), &rows).await.map_err(SessionEnd::Store)?;
                    metrics::histogram!("portfleet_ingest_batch_duration_seconds")
                        .record(received.elapsed().as_secs_f64());
                    self.answer(id, outcome).await
                }
                .instrument(span)
                .await
            }
            FromAgent::Progress { id, progress } => {
                let outcome = store.apply_progress(&self.fence(id), &progress).await.map_err(SessionEnd::Store)?;
                self.answer(id, outcome).await
            }
            FromAgent::Complete { id, progress } => {
                let (outcome, completed) =
                    store.apply_complete(&self.fence(id), &progress).await.map_err(SessionEnd::Store)?;
                if matches!(outcome, Applied::Done | Applied::Duplicate) {
                    self.fleet.registry.remove_lease(agent_id, id.shard_id);
                    self.fleet.wake.notify_one();
                }
                if let Some(scan) = completed {
                    tracing::info!(scan_id = %scan, "scan completed");
                    self.fleet.notifier.local(Notice::ScanChanged(scan));
                }
                self.answer(id, outcome).await
            }
            FromAgent::Failed { shard_id, lease_epoch, failure } => {
                let (reason, retry) = match failure {
                    // Its policy will refuse every retry: fail the scan now,
                    // naming the agent, rather than after four leases.
                    ShardFailure::OutOfScope(why) => (
                        format!("agent {} refused shard {shard_id} by its own scope policy: {why}", self.opened.name),
                        Retry::Never,
                    ),
                    ShardFailure::Error(reason) => (reason, Retry::UpTo(self.fleet.config.max_shard_failures)),
                };
                tracing::warn!(%shard_id, %reason, "agent reports a failed shard");
                let outcome = store
                    .fail_shard(shard_id, lease_epoch, agent_id, &reason, retry)
                    .await
                    .map_err(SessionEnd::Store)?;
                self.fleet.registry.remove_lease(agent_id, shard_id);
                self.fleet.wake.notify_one();
                if let FailOutcome::ScanFailed(scan) = outcome {
                    tracing::warn!(scan_id = %scan, "scan failed");
                    self.fleet.notifier.local(Notice::ScanChanged(scan));
                }
                Ok(())
            }
            FromAgent::Released { shard_id, lease_epoch, agent_leaving } => {
                if agent_leaving && self.fleet.registry.leave(agent_id).is_some() {
                    // Before the scheduler wakes: no new work for a leaver.
                    tracing::info!("agent is shutting down");
                    let _ = store.set_agent_state(agent_id, generation, AgentState::Draining).await;
                }
                store.release_lease(shard_id, lease_epoch, agent_id).await.map_err(SessionEnd::Store)?;
                self.fleet.registry.remove_lease(agent_id, shard_id);
                self.fleet.wake.notify_one();
                Ok(())
            }
        }
    }
}

/// A reported port at its position in the scan's space, which also proves
/// it belongs to the scan.
fn port_record(r: Reported, space: &ScanSpace) -> Result<PortRecord, String> {
    let position =
        space.position_of(r.ip, r.port).ok_or_else(|| format!("{} port {} is not part of this scan", r.ip, r.port))?;
    Ok(PortRecord {
        position: i64::try_from(position).map_err(|_| "position out of range".to_string())?,
        ip: r.ip,
        port: i32::from(r.port),
        observed_at: r.observed_at,
        // A struct of plain fields always serialises.
        service: r.service.map(|s| serde_json::to_string(&s).unwrap_or_default()),
        host_answers_everything: r.host_answers_everything,
    })
}
