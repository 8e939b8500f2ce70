//! One leased shard: rebuilds the scan's index space from the Assign,
//! runs the engine over the leased range, and turns its events into
//! frames - result batches, then each checkpoint after the results below
//! it, then completion (or a hand-back, or a failure).

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use portfleet_core::{AddressSet, PortSet, ScanSpace, ScanType, ShardRange, permutation::Permutation};
use portfleet_proto::v1::{self as pb, agent_message::Frame as Out};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Agent, Slot, outbox::Outbox};
use crate::engine::{self, Counts, EngineControl, Event, Finding, ScanJob};

/// What to do with a shard that is stopped before it is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopMode {
    /// The controller cancelled it: forget it.
    Drop,
    /// This agent is shutting down: report the checkpoint, hand it back.
    Release,
}

const FLUSH_EVERY: Duration = Duration::from_millis(100);

fn msg(frame: Out) -> pb::AgentMessage {
    pb::AgentMessage { frame: Some(frame) }
}

fn counts(c: &Counts) -> pb::ShardCounts {
    pb::ShardCounts { sent: c.sent, open: c.open, closed: c.closed, filtered: c.filtered }
}

/// The agent's own rate ceiling for one shard.
pub(super) fn capped(agent: &Agent, rate: u32) -> u32 {
    let c = &agent.config;
    if c.max_rate == 0 { rate.max(1) } else { rate.clamp(1, (c.max_rate / c.max_shards.max(1)).max(1)) }
}

/// Registers the lease and starts its task.
pub(super) fn start(agent: &Arc<Agent>, a: pb::Assign) {
    let shard = a.shard_id;
    let control = Arc::new(EngineControl::new(capped(agent, a.rate)));
    let stop = CancellationToken::new();
    let stop_mode = Arc::new(Mutex::new(StopMode::Drop));
    let counts = Arc::new(Mutex::new(None));
    let slot = Slot {
        epoch: a.lease_epoch,
        outbox: Outbox::new(0, agent.limits().max_unacked),
        stop: stop.clone(),
        stop_mode: stop_mode.clone(),
        control: control.clone(),
        counts: counts.clone(),
        finished: false,
    };
    if let Some(old) = agent.lock().insert(shard, slot) {
        old.stop.cancel();
    }
    tracing::info!(
        shard_id = shard,
        epoch = a.lease_epoch,
        start = a.start_index,
        end = a.end_index,
        rate = a.rate,
        "shard assigned"
    );
    if agent.stopping.load(std::sync::atomic::Ordering::Relaxed) {
        // Shutting down: hand it straight back.
        agent.push_final(
            shard,
            msg(Out::Released(pb::ShardReleased { shard_id: shard, lease_epoch: a.lease_epoch, agent_leaving: true })),
        );
        return;
    }
    tokio::spawn(run(agent.clone(), a, stop, stop_mode, control, counts));
}

fn job(agent: &Agent, a: &pb::Assign, control: Arc<EngineControl>) -> Result<ScanJob, String> {
    let p = a.scan.as_ref().ok_or("assign without scan parameters")?;
    let addrs = AddressSet::parse_ranges(&p.address_ranges).map_err(|e| format!("address ranges: {e}"))?;
    // The agent's own scope, whatever the controller says.
    if let Some(range) = agent.config.policy.first_offending(&addrs) {
        return Err(format!("refused by the agent's scope policy: {range} is outside its --allow/--deny"));
    }
    let ports = PortSet::parse(&p.ports).map_err(|e| format!("ports: {e}"))?;
    let space = ScanSpace::new(addrs, ports, p.seed, Permutation::MAX_LEN).map_err(|e| e.to_string())?;
    if space.len() != p.total {
        return Err(format!("index space of {} positions, the controller planned {}", space.len(), p.total));
    }
    if a.start_index > a.end_index || a.end_index > space.len() {
        return Err(format!("range {}..{} outside the scan's {} positions", a.start_index, a.end_index, space.len()));
    }
    let scan_type = match pb::ScanType::try_from(p.scan_type) {
        Ok(pb::ScanType::Connect) => ScanType::Connect,
        Ok(pb::ScanType::Syn) if agent.raw_socket => ScanType::Syn,
        Ok(pb::ScanType::Syn) => return Err("SYN scan assigned to an agent without raw sockets".into()),
        _ => return Err(format!("unknown scan type {}", p.scan_type)),
    };
    let rate = control.rate();
    let mut job = ScanJob::new(Arc::new(space), scan_type, rate);
    job.control = control;
    job.range = ShardRange { start: a.start_index, end: a.end_index };
    job.retries = p.retries;
    job.wait = agent.config.wait;
    job.net = agent.config.net.clone();
    job.deny = Arc::new(agent.config.policy.denied());
    Ok(job)
}

fn port_result(f: &Finding) -> pb::PortResult {
    let ip = match f.ip {
        std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
        std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    let at = f.observed_at.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    pb::PortResult {
        ip,
        port: u32::from(f.port),
        state: pb::PortState::Open as i32,
        observed_at: Some(prost_types::Timestamp { seconds: at.as_secs() as i64, nanos: at.subsec_nanos() as i32 }),
    }
}

async fn run(
    agent: Arc<Agent>,
    a: pb::Assign,
    stop: CancellationToken,
    stop_mode: Arc<Mutex<StopMode>>,
    control: Arc<EngineControl>,
    counts_slot: Arc<Mutex<Option<Arc<engine::LiveCounts>>>>,
) {
    let (shard, epoch) = (a.shard_id, a.lease_epoch);
    let fail = |reason: String| {
        tracing::warn!(shard_id = shard, %reason, "shard failed");
        agent.push_final(shard, msg(Out::Failed(pb::ShardFailed { shard_id: shard, lease_epoch: epoch, reason })));
    };
    let job = match job(&agent, &a, control.clone()) {
        Ok(j) => j,
        Err(reason) => return fail(reason),
    };
    let (tx, mut rx) = mpsc::channel(4096);
    let handle = match engine::start(job, tx, stop.clone()).await {
        Ok(h) => h,
        Err(e) => return fail(e.to_string()),
    };
    *counts_slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.counts());
    let max_batch = agent.limits().max_batch;
    let mut batch: Vec<pb::PortResult> = Vec::new();
    let flush = |batch: Vec<pb::PortResult>| {
        let agent = agent.clone();
        let control = control.clone();
        async move {
            if batch.is_empty() {
                return true;
            }
            agent
                .push(shard, &control, |seq| {
                    msg(Out::Results(pb::ResultBatch { shard_id: shard, lease_epoch: epoch, seq, results: batch }))
                })
                .await
        }
    };
    let mut deadline = tokio::time::Instant::now() + FLUSH_EVERY;
    loop {
        let event = tokio::select! {
            ev = rx.recv() => ev,
            _ = tokio::time::sleep_until(deadline), if !batch.is_empty() => {
                if !flush(std::mem::take(&mut batch)).await {
                    return stop.cancel();
                }
                continue;
            }
        };
        match event {
            Some(Event::Open(f)) => {
                if batch.is_empty() {
                    deadline = tokio::time::Instant::now() + FLUSH_EVERY;
                }
                batch.push(port_result(&f));
                if batch.len() >= max_batch && !flush(std::mem::take(&mut batch)).await {
                    return stop.cancel();
                }
            }
            Some(Event::Checkpoint { position, counts: c }) => {
                // Results below the checkpoint go first: the controller
                // commits frames of a lease in order.
                if !flush(std::mem::take(&mut batch)).await {
                    return stop.cancel();
                }
                let pushed = agent
                    .push(shard, &control, |seq| {
                        msg(Out::Progress(pb::Progress {
                            shard_id: shard,
                            lease_epoch: epoch,
                            seq,
                            checkpoint: position,
                            counts: Some(counts(&c)),
                        }))
                    })
                    .await;
                if !pushed {
                    return stop.cancel();
                }
            }
            None => break,
        }
    }
    if !flush(std::mem::take(&mut batch)).await {
        return;
    }
    let summary = match handle.wait().await {
        Ok(s) => s,
        Err(e) => return fail(e.to_string()),
    };
    tracing::info!(
        shard_id = shard,
        sent = summary.counts.sent,
        open = summary.counts.open,
        checkpoint = summary.checkpoint,
        "shard engine finished"
    );
    if summary.checkpoint >= a.end_index {
        let c = summary.counts;
        let pushed = agent
            .push(shard, &control, |seq| {
                msg(Out::Complete(pb::ShardComplete {
                    shard_id: shard,
                    lease_epoch: epoch,
                    seq,
                    counts: Some(counts(&c)),
                }))
            })
            .await;
        if pushed {
            mark_finished(&agent, shard);
        }
        return;
    }
    let mode = *stop_mode.lock().unwrap_or_else(|p| p.into_inner());
    if mode == StopMode::Release {
        let c = summary.counts;
        let cp = summary.checkpoint;
        agent
            .push(shard, &control, |seq| {
                msg(Out::Progress(pb::Progress {
                    shard_id: shard,
                    lease_epoch: epoch,
                    seq,
                    checkpoint: cp,
                    counts: Some(counts(&c)),
                }))
            })
            .await;
        agent.push_final(
            shard,
            msg(Out::Released(pb::ShardReleased { shard_id: shard, lease_epoch: epoch, agent_leaving: true })),
        );
        tracing::info!(shard_id = shard, checkpoint = cp, "shard handed back");
    }
}

fn mark_finished(agent: &Agent, shard: u64) {
    if let Some(slot) = agent.lock().get_mut(&shard) {
        slot.finished = true;
    }
    agent.outgoing.notify_one();
}
