//! Applies the controller's frames, in order, for one connection: Assign
//! opens a lease and starts its shard task, Ack trims a lease's outbox,
//! Cancel and lost-lease refusals drop a lease, RateUpdate re-paces an
//! engine, heartbeat echoes refresh the leases' freshness.

use std::sync::Arc;

use tracing::Instrument;

use super::{
    Agent,
    connection::SessionEnd,
    shard,
    wire::{Assignment, FrameSource, Inbound, RejectedAssign, ShardFrame},
};

/// Reads until the stream ends; returns how it ended.
pub async fn run(agent: Arc<Agent>, mut source: FrameSource) -> SessionEnd {
    loop {
        match source.next().await {
            Ok(Some(Ok(frame))) => apply(&agent, frame),
            Ok(Some(Err(e))) => tracing::warn!(error = %e, "controller frame ignored"),
            Ok(None) => return SessionEnd::Closed,
            Err(status) => return SessionEnd::Broken(status),
        }
    }
}

fn apply(agent: &Agent, frame: Inbound) {
    match frame {
        Inbound::Assign(assigned) => assign(agent, *assigned),
        Inbound::Ack(ack) => {
            if let Some(lease) = agent.leases.get(ack.lease) {
                lease.ack(ack.seq);
            }
            agent.leases.reap();
        }
        Inbound::Cancel(c) => {
            tracing::info!(shard_id = c.lease.shard.get(), reason = %c.reason, "shard cancelled by the controller");
            agent.leases.drop_lease(c.lease);
        }
        Inbound::Rate(r) => {
            if let Some(lease) = agent.leases.get(r.lease) {
                lease.control().set_rate(agent.shards.cap(r.rate));
            }
        }
        Inbound::Drain => tracing::info!("draining: finishing shards, taking no new ones"),
        Inbound::Refused(r) => {
            let shard_id = r.lease.map(|l| l.shard.get());
            tracing::warn!(shard_id, seq = r.seq.map(|s| s.get()), reason = %r.reason, detail = %r.message,
                "frame refused");
            if let Some(lease) = r.lease.filter(|_| r.reason.lease_gone()) {
                agent.leases.drop_lease(lease);
            }
        }
        Inbound::HeartbeatEcho { sent_at } => {
            if let Some(at) = sent_at {
                agent.contact.echoed(at);
            }
        }
        // Only the first frame of a session is a Welcome; a later one
        // changes nothing.
        Inbound::Welcome(_) => {}
    }
}

/// Opens the lease and starts its shard task - or, shutting down, hands it
/// straight back; or fails it when its work is unusable or not this
/// agent's to do.
fn assign(agent: &Agent, assigned: Result<Assignment, RejectedAssign>) {
    let (id, scan_id, trace_parent) = match &assigned {
        Ok(a) => (a.lease, a.scan_id.as_str(), a.trace_parent.as_ref()),
        Err(r) => (r.lease, "", None),
    };
    let span = shard::span(&agent.span, id, scan_id, trace_parent);
    let _in_shard = span.enter();
    let rate = assigned.as_ref().map_or(0, |a| a.rate);
    let limits = agent.limits();
    let lease = agent.leases.open(id, limits.max_unacked, agent.shards.cap(rate));
    match &assigned {
        Ok(a) => tracing::info!(start = a.range.start, end = a.range.end, rate, "shard assigned"),
        Err(_) => tracing::info!("shard assigned"),
    }
    if agent.is_stopping() {
        lease.push_final(ShardFrame::Released { lease: id, agent_leaving: true });
        return;
    }
    let admitted = match assigned {
        Ok(a) => agent.shards.admit(&a).map(|()| a).map_err(|e| e.to_string()),
        Err(r) => Err(r.reason.to_string()),
    };
    match admitted {
        Ok(a) => {
            let task = shard::run(lease, a, agent.shards.clone(), limits.max_batch);
            agent.tasks.spawn(task.instrument(span.clone()));
        }
        Err(reason) => shard::fail(&lease, reason),
    }
}
