//! One leased shard: checks the assignment against the agent's own scope
//! and capabilities, runs the engine over the leased range, and turns its
//! events into frames - result batches, then each checkpoint after the
//! results below it, then completion (or a hand-back, or a failure).
//!
//! A shard task works through its own [`Lease`] handle only: its outbox
//! (whose room paces the engine), its stop token and mode, its engine
//! control. It never touches the registry of leases or the connection.

use std::{sync::Arc, time::Duration};

use portfleet_core::{AddrRange, AddressSet, ScanType, ScopePolicy};
use portfleet_telemetry::otel::{self, TraceParent};
use tokio::sync::mpsc;

use super::{
    leases::{Lease, StopMode},
    wire::{Assignment, LeaseId, ShardFrame},
};
use crate::{
    engine::{self, Event, ScanJob},
    identify::{Gate, Identified, Identifier, Item, Pipeline},
    net::NetOptions,
};

/// A batch of results goes out at most this long after its first result.
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// Engine events buffered between the engine and its shard task.
const ENGINE_EVENTS: usize = 4096;

/// What every shard task takes from the agent's configuration.
#[derive(Debug)]
pub struct ShardSettings {
    /// Longest wait for a reply to a probe.
    pub wait: Duration,
    pub net: NetOptions,
    /// What this agent will probe, whatever it is assigned.
    pub policy: Arc<ScopePolicy>,
    /// The policy's complement, for the engine's per-probe check.
    pub deny: Arc<AddressSet>,
    pub raw_socket: bool,
    /// Probes per second over all shards; 0 for no limit.
    pub max_rate: u32,
    pub max_shards: u32,
    /// The identification stage; `None` when this agent does not identify
    /// (`--no-identify`), whatever the scan asks.
    pub identifier: Option<Arc<Identifier>>,
}

/// Why this agent will not run an assignment it understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("refused by the agent's scope policy: {0} is outside its --allow/--deny")]
    OutOfScope(AddrRange),
    #[error("SYN scan assigned to an agent without raw sockets")]
    NoRawSockets,
}

impl ShardSettings {
    /// The agent's own rate ceiling for one shard.
    pub fn cap(&self, rate: u32) -> u32 {
        if self.max_rate == 0 { rate.max(1) } else { rate.clamp(1, (self.max_rate / self.max_shards.max(1)).max(1)) }
    }

    /// Checks an assignment against the agent's own scope, whatever the
    /// controller says, and against what this host can do.
    pub fn admit(&self, a: &Assignment) -> Result<(), Refusal> {
        if let Some(range) = self.policy.first_offending(a.space.addresses()) {
            return Err(Refusal::OutOfScope(range));
        }
        if a.scan_type == ScanType::Syn && !self.raw_socket {
            return Err(Refusal::NoRawSockets);
        }
        Ok(())
    }

    fn job(&self, a: &Assignment, lease: &Lease) -> ScanJob {
        let control = lease.control().clone();
        let mut job = ScanJob::new(a.space.clone(), a.scan_type, control.rate());
        job.control = control;
        job.range = a.range;
        job.retries = a.retries;
        job.wait = self.wait;
        job.net = self.net.clone();
        job.deny = self.deny.clone();
        job
    }
}

/// The span a shard's work runs in: outside any one connection, since a
/// shard keeps scanning across reconnects. When traces are exported it is
/// the shard's trace span too, continuing the Assign's (`trace_parent`).
pub fn span(
    parent: &tracing::Span,
    lease: LeaseId,
    scan_id: &str,
    trace_parent: Option<&TraceParent>,
) -> tracing::Span {
    let (shard_id, epoch) = (lease.shard.get(), lease.epoch.get());
    if !otel::enabled() {
        return tracing::info_span!(parent: parent, "shard", scan_id, shard_id, epoch);
    }
    let span = tracing::info_span!(parent: parent, "shard", otel.kind = "consumer", scan_id, shard_id, epoch);
    otel::continue_trace(&span, trace_parent);
    span
}

/// Reports that the lease cannot be run; its last frame.
pub fn fail(lease: &Lease, reason: String) {
    tracing::warn!(%reason, "shard failed");
    lease.push_final(ShardFrame::Failed { lease: lease.id(), reason });
}

/// Works the lease until its range is done, it is stopped, or the engine
/// fails. `max_batch` bounds a result batch.
pub async fn run(lease: Arc<Lease>, a: Assignment, settings: Arc<ShardSettings>, max_batch: usize) {
    let id = lease.id();
    let stop = lease.stop_token().clone();
    let (tx, mut rx) = mpsc::channel(ENGINE_EVENTS);
    let handle = match engine::start(settings.job(&a, &lease), tx, stop.clone()).await {
        Ok(h) => h,
        Err(e) => return fail(&lease, e.to_string()),
    };
    lease.set_counts(handle.counts());
    let mut pipeline = match (&settings.identifier, a.identify) {
        (Some(identifier), true) => {
            let gate = Arc::new(Gate::new(settings.deny.clone(), lease.control().clone()));
            Pipeline::identifying(identifier.clone(), gate, a.names.clone(), a.port_threshold)
        }
        _ => Pipeline::plain(),
    };
    let mut batch: Vec<Identified> = Vec::new();
    // Each batch names the shard's span (or passes the Assign's context on,
    // untraced), computed once: the controller's ingest spans continue it.
    let trace_parent = otel::propagate(&tracing::Span::current(), a.trace_parent.as_ref());
    let flush = |results: Vec<Identified>| {
        let (lease, trace_parent) = (lease.clone(), trace_parent.clone());
        async move {
            if results.is_empty() {
                return true;
            }
            lease.push(|seq| ShardFrame::Results { lease: id, seq, results, trace_parent }).await
        }
    };
    let mut deadline = tokio::time::Instant::now() + FLUSH_EVERY;
    let mut meter = crate::metrics::ShardMeter::default();
    let mut engine_done = false;
    let identifying = pipeline.identifies();
    loop {
        if engine_done && pipeline.is_empty() {
            break;
        }
        let item = tokio::select! {
            biased;
            // Stopped: the engine ends within milliseconds; see below.
            _ = stop.cancelled(), if identifying => break,
            ev = rx.recv(), if !engine_done => {
                match ev {
                    Some(Event::Open(f)) => pipeline.push_open(f),
                    Some(Event::Checkpoint { position, counts }) => {
                        meter.observe(&counts);
                        pipeline.push_checkpoint(position, counts)
                    }
                    None => engine_done = true,
                }
                continue;
            }
            item = pipeline.next(), if !pipeline.is_empty() => item,
            _ = tokio::time::sleep_until(deadline), if !batch.is_empty() => {
                if !flush(std::mem::take(&mut batch)).await {
                    return stop.cancel();
                }
                continue;
            }
        };
        match item {
            Some(Item::Found(f)) => {
                if batch.is_empty() {
                    deadline = tokio::time::Instant::now() + FLUSH_EVERY;
                }
                batch.push(*f);
                if batch.len() >= max_batch && !flush(std::mem::take(&mut batch)).await {
                    return stop.cancel();
                }
            }
            Some(Item::Checkpoint { position, counts }) => {
                // Results below the checkpoint go first: the controller
                // commits frames of a lease in order.
                if !flush(std::mem::take(&mut batch)).await {
                    return stop.cancel();
                }
                let pushed =
                    lease.push(|seq| ShardFrame::Progress { lease: id, seq, checkpoint: position, counts }).await;
                if !pushed {
                    return stop.cancel();
                }
            }
            None => {}
        }
    }
    // Stopped while identifying: what is identified goes out, with the
    // checkpoints it covers; the rest is dropped with the pipeline, so no
    // checkpoint moves past it - whoever resumes the shard finds and
    // identifies those ports again. The engine's last events are drained
    // so that it can finish.
    let mut reported_all = pipeline.is_empty();
    while let Some(ev) = rx.recv().await {
        if let Event::Open(_) = ev {
            reported_all = false;
        }
    }
    for item in pipeline.ready() {
        match item {
            Item::Found(f) => batch.push(*f),
            Item::Checkpoint { position, counts } => {
                if !flush(std::mem::take(&mut batch)).await {
                    return;
                }
                lease.push(|seq| ShardFrame::Progress { lease: id, seq, checkpoint: position, counts }).await;
            }
        }
    }
    reported_all &= pipeline.is_empty();
    drop(pipeline);
    if !flush(std::mem::take(&mut batch)).await {
        return;
    }
    let summary = match handle.wait().await {
        Ok(s) => s,
        Err(e) => return fail(&lease, e.to_string()),
    };
    let (counts, checkpoint) = (summary.counts, summary.checkpoint);
    meter.observe(&counts);
    tracing::info!(sent = counts.sent, open = counts.open, checkpoint, "shard engine finished");
    if checkpoint >= a.range.end && reported_all {
        if lease.push(|seq| ShardFrame::Complete { lease: id, seq, counts }).await {
            lease.finish();
        }
        return;
    }
    if lease.stop_mode() == Some(StopMode::Release) {
        if reported_all {
            lease.push(|seq| ShardFrame::Progress { lease: id, seq, checkpoint, counts }).await;
        }
        lease.push_final(ShardFrame::Released { lease: id, agent_leaving: true });
        tracing::info!(checkpoint, "shard handed back");
    }
}

#[cfg(test)]
mod tests {
    use portfleet_core::{PortSet, ScanSpace, ShardRange};

    use super::*;
    use crate::session::wire::{LeaseEpoch, ShardId};

    fn settings(allow: &str, raw_socket: bool, max_rate: u32) -> ShardSettings {
        let allow = portfleet_core::policy::parse_cidrs(allow).unwrap();
        let policy = Arc::new(ScopePolicy::for_agent(&allow, &[]));
        ShardSettings {
            wait: Duration::from_secs(1),
            net: NetOptions::default(),
            deny: Arc::new(policy.denied()),
            policy,
            raw_socket,
            max_rate,
            max_shards: 4,
            identifier: None,
        }
    }

    fn assignment(scan_type: ScanType) -> Assignment {
        let addrs = AddressSet::parse_ranges(&["192.0.2.0-192.0.2.3"]).unwrap();
        let space = ScanSpace::new(addrs, PortSet::parse("80").unwrap(), 0, u64::MAX).unwrap();
        let lease = LeaseId { shard: ShardId::try_from(1).unwrap(), epoch: LeaseEpoch::try_from(1).unwrap() };
        let range = ShardRange { start: 0, end: space.len() };
        Assignment {
            lease,
            scan_id: "s".into(),
            space: Arc::new(space),
            scan_type,
            range,
            retries: 1,
            rate: 100,
            identify: false,
            names: Arc::default(),
            port_threshold: 0,
            trace_parent: None,
        }
    }

    /// The reasons the shard task used to report, word for word.
    #[test]
    fn refuses_work_outside_its_scope_or_beyond_its_privileges() {
        let connect = assignment(ScanType::Connect);
        assert_eq!(settings("192.0.2.0/24", false, 0).admit(&connect), Ok(()));
        let narrow = settings("192.0.2.0/31", true, 0).admit(&connect).unwrap_err();
        assert_eq!(
            narrow.to_string(),
            "refused by the agent's scope policy: 192.0.2.2-192.0.2.3 is outside its --allow/--deny"
        );
        let syn = assignment(ScanType::Syn);
        assert_eq!(settings("192.0.2.0/24", true, 0).admit(&syn), Ok(()));
        let unprivileged = settings("192.0.2.0/24", false, 0).admit(&syn).unwrap_err();
        assert_eq!(unprivileged.to_string(), "SYN scan assigned to an agent without raw sockets");
    }

    #[test]
    fn the_agent_caps_each_shard_at_its_share_of_its_own_rate() {
        assert_eq!(settings("", true, 0).cap(0), 1);
        assert_eq!(settings("", true, 0).cap(5000), 5000);
        assert_eq!(settings("", true, 1000).cap(5000), 250);
        assert_eq!(settings("", true, 2).cap(5000), 1);
    }
}
