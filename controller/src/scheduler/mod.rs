//! Hands pending shards to this controller's agents, splits each scan's
//! rate across the leases working on it, and keeps the fleet's shared state
//! honest: expired leases go back to the queue, stale local leases are
//! cancelled, finished scans are completed, waiting scans say why.
//!
//! Every controller runs one scheduler against the same database; claims
//! are `FOR UPDATE SKIP LOCKED`, and the global chores are idempotent.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::Arc,
    time::Duration,
};

use portfleet_core::ScanType;
use portfleet_telemetry::{otel, trace_span};
use tokio::{
    sync::{Notify, broadcast::error::RecvError},
    time::Instant,
};
use uuid::Uuid;

use crate::{
    notify::Notice,
    sessions::{
        Fleet, LeaseInfo,
        registry::{Candidate, Outbound},
        wire::{Assignment, ToAgent},
    },
    store::{AgentClass, AgentStanding, FleetGroup, Grant, LeaseEpoch, ShardId, ShardState, StoreError},
};

mod rates;

use rates::{RatesMemo, ScanRates, apply_rates, lease_rate, scan_rates};

/// Rate passes asked for within this long are done once.
const REBALANCE_DEBOUNCE: Duration = Duration::from_millis(5);

/// Runs the scheduler until shutdown: assignment and upkeep in two loops,
/// so a slow upkeep pass (a large fleet) never delays handing out work.
pub async fn run(fleet: Arc<Fleet>) {
    let rebalance_due = Arc::new(Notify::new());
    tokio::join!(assign_loop(fleet.clone(), rebalance_due.clone()), upkeep_loop(fleet, rebalance_due));
}

/// Assignment, and every rate pass: one task does both, so a pass computed
/// from older rows can never overwrite a newer one.
async fn assign_loop(fleet: Arc<Fleet>, rebalance_due: Arc<Notify>) {
    let mut notices = fleet.notifier.subscribe();
    let mut memo = RatesMemo::default();
    let mut tick = tokio::time::interval(fleet.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rebalance_at: Option<Instant> = None;
    loop {
        let due = rebalance_at;
        let mut later = || {
            rebalance_at.get_or_insert_with(|| Instant::now() + REBALANCE_DEBOUNCE);
            Ok(())
        };
        let result = tokio::select! {
            _ = fleet.shutdown.cancelled() => return,
            () = async { tokio::time::sleep_until(due.unwrap_or_else(Instant::now)).await }, if due.is_some() => {
                rebalance_at = None;
                rebalance(&fleet, &mut memo).await
            }
            _ = rebalance_due.notified() => later(),
            _ = fleet.wake.notified() => assign(&fleet, &mut memo).await,
            _ = tick.tick() => assign(&fleet, &mut memo).await,
            notice = notices.recv() => match notice {
                Ok(Notice::ScanCreated(_)) => assign(&fleet, &mut memo).await,
                // A scan started or ended, or gained leases (here or on
                // another controller): shares and caps split differently.
                Ok(Notice::ScanChanged(id)) => stop_leases_of(&fleet, id).await.and_then(|()| later()),
                Ok(Notice::Leases(_)) => later(),
                Ok(Notice::AgentDrain(id)) => {
                    drain(&fleet, id).await;
                    Ok(())
                }
                Ok(Notice::Results(_)) => Ok(()),
                Ok(Notice::Resync) | Err(RecvError::Lagged(_)) => check_leases(&fleet).await.and_then(|()| later()),
                Err(RecvError::Closed) => return,
            },
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "scheduler pass failed; retrying");
        }
    }
}

async fn upkeep_loop(fleet: Arc<Fleet>, rebalance_due: Arc<Notify>) {
    let mut chores = tokio::time::interval(Duration::from_secs(1));
    chores.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut rounds = 0u64;
    loop {
        tokio::select! {
            _ = fleet.shutdown.cancelled() => return,
            _ = chores.tick() => {}
        }
        if let Err(e) = housekeeping(&fleet).await {
            tracing::warn!(error = %e, "scheduler upkeep failed; retrying");
        }
        // Shares change as leases come and go anywhere in the fleet.
        rebalance_due.notify_one();
        rounds += 1;
        // Events no ingress published within a day (none configured).
        if rounds.is_multiple_of(60)
            && let Err(e) = fleet.store.expire_events().await
        {
            tracing::warn!(error = %e, "cannot expire old events");
        }
    }
}

/// Claims work for every local agent with room, and delivers it.
#[tracing::instrument(name = "scheduler.assign", skip_all)]
async fn assign(fleet: &Fleet, memo: &mut RatesMemo) -> Result<(), StoreError> {
    let cfg = &fleet.config;
    let mut exhausted: HashSet<AgentClass> = HashSet::new();
    let mut granted: Vec<(Candidate, Grant)> = Vec::new();
    for agent in fleet.registry.candidates() {
        // What one agent of a class could not get, no other can: skip them
        // - unless a scan's max_agents admits agents by who they are.
        if exhausted.contains(&agent.class) {
            continue;
        }
        let grants = fleet
            .store
            .claim_shards(agent.agent_id, &cfg.controller_id, &agent.class, agent.free, cfg.lease_ttl)
            .await?;
        if (grants.len() as u32) < agent.free && !fleet.store.has_agent_limited_work(&agent.class).await? {
            exhausted.insert(agent.class.clone());
        }
        granted.extend(grants.into_iter().map(|g| (agent.clone(), g)));
    }
    if granted.is_empty() {
        return Ok(());
    }
    // Rates with the new leases counted; running leases slow down first, so
    // new work never adds to a block before the old work has made room.
    let rates = scan_rates(fleet, memo).await?;
    if !apply_rates(fleet, &rates) {
        for (_, g) in granted {
            fleet.store.return_undelivered(g.shard_id, g.lease_epoch).await?;
        }
        return Ok(());
    }
    for (agent, g) in granted {
        deliver(fleet, &agent, g, &rates).await?;
    }
    Ok(())
}

async fn deliver(fleet: &Fleet, agent: &Candidate, g: Grant, rates: &ScanRates) -> Result<(), StoreError> {
    // The claim checked the scan was pending or running; a scan whose plan
    // cannot be read gets no work.
    let Some(plan) = fleet.plans.get(g.scan_id).await? else {
        fleet.store.return_undelivered(g.shard_id, g.lease_epoch).await?;
        return Ok(());
    };
    // A SYN scan reaches a connect-only agent only when the scan allows the
    // fallback (the claim checked): it then runs as a connect scan there.
    let scan_type = match plan.scan_type {
        ScanType::Syn if agent.class.raw_socket => ScanType::Syn,
        _ => ScanType::Connect,
    };
    // Not leased by the time rates were read (it lapsed meanwhile): the
    // next pass sets its share; until then the least.
    let (scan_rate, leases) = rates.get(&g.scan_id).copied().unwrap_or((1, 1));
    let rate = lease_rate(scan_rate, leases, agent.max_rate, agent.max_shards);
    // A span per Assign in the scan's trace (stored with the scan, so any
    // controller continues it); the agent's shard span is its child.
    let span = trace_span!("shard.assign", otel.kind = "producer", scan_id = %g.scan_id, shard_id = %g.shard_id,
        epoch = %g.lease_epoch, agent_id = %agent.agent_id, start = g.checkpoint, end = g.end_index, rate);
    otel::continue_trace(&span, plan.trace_parent.as_ref());
    let trace_parent = otel::propagate(&span, plan.trace_parent.as_ref());
    let assignment = Assignment {
        shard_id: g.shard_id,
        lease_epoch: g.lease_epoch,
        plan,
        scan_type,
        start: g.checkpoint,
        end: g.end_index,
        rate,
        trace_parent,
    };
    fleet.registry.add_lease(
        agent.agent_id,
        g.shard_id,
        LeaseInfo { lease_epoch: g.lease_epoch, scan_id: g.scan_id, rate },
    );
    if agent.tx.try_send(ToAgent::Assign(assignment)).is_err() {
        // The session is gone or not reading: the shard goes back at once.
        fleet.registry.remove_lease(agent.agent_id, g.shard_id);
        fleet.store.return_undelivered(g.shard_id, g.lease_epoch).await?;
        return Ok(());
    }
    span.in_scope(|| {
        tracing::info!(agent_id = %agent.agent_id, shard_id = %g.shard_id, scan_id = %g.scan_id,
            start = g.checkpoint, end = g.end_index, rate, "shard assigned")
    });
    Ok(())
}

/// Re-splits every scan's (capped) rate over its leases, fleet-wide, and
/// tells local agents whose share changed.
#[tracing::instrument(name = "scheduler.rebalance", skip_all)]
async fn rebalance(fleet: &Fleet, memo: &mut RatesMemo) -> Result<(), StoreError> {
    if fleet.registry.leases().is_empty() {
        return Ok(());
    }
    let rates = scan_rates(fleet, memo).await?;
    apply_rates(fleet, &rates);
    Ok(())
}

/// Tells local agents to stop the leases of a scan that is over.
async fn stop_leases_of(fleet: &Fleet, scan_id: Uuid) -> Result<(), StoreError> {
    let local: Vec<_> = fleet.registry.leases().into_iter().filter(|l| l.info.scan_id == scan_id).collect();
    if local.is_empty() {
        return Ok(());
    }
    let Some(state) = fleet.store.scan_state(scan_id).await? else { return Ok(()) };
    if state.is_active() {
        return Ok(());
    }
    for l in local {
        cancel(fleet, &l.tx, l.agent_id, l.shard_id, l.info.lease_epoch, &format!("scan {state}"));
    }
    Ok(())
}

fn cancel(fleet: &Fleet, tx: &Outbound, agent: Uuid, shard_id: ShardId, lease_epoch: LeaseEpoch, reason: &str) {
    fleet.registry.remove_lease(agent, shard_id);
    if tx.try_send(ToAgent::Cancel { shard_id, lease_epoch, reason: reason.to_string() }).is_err() {
        // A session that cannot take a Cancel is stuck: close it.
        fleet.registry.close(agent);
    }
    tracing::info!(agent_id = %agent, %shard_id, reason, "lease cancelled");
}

/// Compares local leases with the database and cancels those that are no
/// longer held (cancelled scans, expired leases): the fallback for missed
/// notifications.
#[tracing::instrument(name = "scheduler.check_leases", skip_all)]
async fn check_leases(fleet: &Fleet) -> Result<(), StoreError> {
    let local = fleet.registry.leases();
    if local.is_empty() {
        return Ok(());
    }
    let ids: Vec<ShardId> = local.iter().map(|l| l.shard_id).collect();
    let states: HashMap<ShardId, _> = fleet.store.lease_states(&ids).await?.into_iter().map(|s| (s.id, s)).collect();
    for l in local {
        let held = states.get(&l.shard_id).is_some_and(|s| {
            s.state == ShardState::Leased && s.lease_epoch == l.info.lease_epoch && s.agent_id == Some(l.agent_id)
        });
        if !held {
            let why = states.get(&l.shard_id).map_or("gone", |s| s.state.as_str());
            cancel(fleet, &l.tx, l.agent_id, l.shard_id, l.info.lease_epoch, &format!("lease no longer held ({why})"));
        }
    }
    Ok(())
}

async fn drain(fleet: &Fleet, agent_id: Uuid) {
    if let Some(tx) = fleet.registry.drain(agent_id) {
        let _ = tx.try_send(ToAgent::Drain);
        tracing::info!(%agent_id, "agent draining");
    }
}

/// Once a second: heartbeats, lease upkeep, completion, progress, and why
/// waiting scans wait.
#[tracing::instrument(name = "scheduler.upkeep", skip_all)]
async fn housekeeping(fleet: &Fleet) -> Result<(), StoreError> {
    let cfg = &fleet.config;
    let store = &fleet.store;
    let (beats, agents) = fleet.registry.take_beats();
    store.record_heartbeats(&beats).await?;
    store.extend_leases(&cfg.controller_id, &agents, cfg.lease_ttl).await?;
    let expired = store.expire_leases().await?;
    if expired > 0 {
        metrics::counter!("portfleet_lease_expiries_total").increment(expired);
        fleet.wake.notify_one();
    }
    store.expire_agents(cfg.lease_ttl * 3).await?;
    check_leases(fleet).await?;
    // Leases extended, and those no longer held cancelled (ahead on the
    // same streams): now the agents may know.
    fleet.registry.echo_heartbeats(&agents);
    let local = fleet.registry.generations();
    if !local.is_empty() {
        let ids: Vec<Uuid> = local.iter().map(|(id, _)| *id).collect();
        // Before the read: a drain noticed while it runs changes the mark,
        // so a read that predates it never ends it.
        let marks: HashMap<Uuid, u64> =
            ids.iter().filter_map(|id| fleet.registry.drain_mark(*id).map(|m| (*id, m))).collect();
        let current: HashMap<Uuid, AgentStanding> =
            store.agent_standings(&ids).await?.into_iter().map(|s| (s.id, s)).collect();
        for (id, generation) in local {
            let Some(now) = current.get(&id) else { continue };
            if now.revoked {
                tracing::warn!(agent_id = %id, "closing the session of a revoked agent");
                fleet.registry.close(id);
            } else if now.generation > generation {
                tracing::info!(agent_id = %id, "closing a session superseded by a newer one");
                fleet.registry.close(id);
            } else if now.draining && !fleet.registry.is_draining(id) {
                // A drain whose notification this controller missed (asked
                // while its listener was reconnecting).
                drain(fleet, id).await;
            } else if !now.draining && marks.get(&id).is_some_and(|m| fleet.registry.undrain(id, *m)) {
                // UndrainAgent writes only the column; this is where it
                // takes effect.
                tracing::info!(agent_id = %id, "agent undrained");
                fleet.wake.notify_one();
            }
        }
    }
    store.complete_finished_scans().await?;
    store.roll_up_progress().await?;
    explain_waiting(fleet).await
}

/// Sets `waiting_reason` on every pending scan from what the fleet is
/// now (and clears it where a scan could start): a pass a second, so the
/// reason follows its cause.
async fn explain_waiting(fleet: &Fleet) -> Result<(), StoreError> {
    let waiting = fleet.store.waiting_scans(100).await?;
    if waiting.is_empty() {
        metrics::gauge!("portfleet_scans_without_capable_agent").set(0.0);
        return Ok(());
    }
    let groups = fleet.store.fleet_groups().await?;
    let mut incapable = 0;
    let reasons: Vec<(Uuid, Option<String>)> = waiting
        .iter()
        .map(|s| {
            let needs = Needs {
                // The claim's rule: a SYN scan needs raw sockets unless it
                // may fall back to connect.
                raw_socket: s.scan_type == ScanType::Syn.as_str() && !s.allow_connect_fallback,
                ipv6: s.has_ipv6,
                selector: &s.agent_selector.0,
            };
            incapable += usize::from(!groups.iter().any(|g| g.agents > 0 && can_run(&needs, g)));
            (s.id, waiting_reason(&needs, &groups))
        })
        .collect();
    metrics::gauge!("portfleet_scans_without_capable_agent").set(incapable as f64);
    fleet.store.set_waiting_reasons(&reasons).await
}

/// What a scan asks of the agent that runs it (as `claim_shards` matches).
struct Needs<'a> {
    raw_socket: bool,
    ipv6: bool,
    selector: &'a BTreeMap<String, String>,
}

/// Agents of group `g` could run a scan that needs `needs`, once they have
/// room (the claim's rules; draining agents take nothing).
fn can_run(needs: &Needs, g: &FleetGroup) -> bool {
    !g.draining
        && needs.selector.iter().all(|(k, v)| g.labels.get(k) == Some(v))
        && (!needs.ipv6 || g.ipv6)
        && (!needs.raw_socket || g.raw_socket)
}

/// Why a pending scan cannot start now, with the counts behind it, or
/// `None` when a connected agent has room for it (it starts within a
/// scheduler tick). Each agent is counted once, under the first reason
/// that rules it out.
fn waiting_reason(needs: &Needs, fleet: &[FleetGroup]) -> Option<String> {
    if fleet.iter().all(|g| g.agents <= 0) {
        return Some("no agent is connected".into());
    }
    let (mut draining, mut unmatched, mut no_ipv6, mut connect_only, mut busy, mut free) = (0, 0, 0, 0, 0, 0);
    for g in fleet {
        let n = g.agents;
        if g.draining {
            draining += n;
        } else if !needs.selector.iter().all(|(k, v)| g.labels.get(k) == Some(v)) {
            unmatched += n;
        } else if needs.ipv6 && !g.ipv6 {
            no_ipv6 += n;
        } else if needs.raw_socket && !g.raw_socket {
            connect_only += n;
        } else if g.busy {
            busy += n;
        } else {
            free += n;
        }
    }
    if free > 0 {
        return None;
    }
    let selector = needs.selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
    let unable: Vec<String> = [
        (draining, "draining".to_string()),
        (unmatched, format!("without the agent_selector labels {{{selector}}}")),
        (no_ipv6, "without IPv6 (the scan has IPv6 targets)".to_string()),
        (
            connect_only,
            "connect-only (a SYN scan needs CAP_NET_RAW, or create it with allow_connect_fallback)".to_string(),
        ),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, why)| format!("{n} {why}"))
    .collect();
    if busy > 0 {
        let limit = if busy == 1 { "its" } else { "their" };
        let mut reason = format!("every agent that can run this scan is busy: {busy} at {limit} shard limit");
        if !unable.is_empty() {
            reason.push_str(&format!("; the others cannot run it: {}", unable.join(", ")));
        }
        return Some(reason);
    }
    Some(format!("no connected agent can run this scan: {}", unable.join(", ")))
}

#[cfg(test)]
mod tests {
    use sqlx::types::Json;

    use super::*;

    fn group(labels: &[(&str, &str)], raw_socket: bool, ipv6: bool, agents: i64) -> FleetGroup {
        FleetGroup {
            raw_socket,
            ipv6,
            labels: Json(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            draining: false,
            busy: false,
            agents,
        }
    }

    #[test]
    fn explains_why_a_scan_waits_with_counts() {
        let none = BTreeMap::new();
        let eu: BTreeMap<String, String> = [("site".to_string(), "eu".to_string())].into();
        let syn = Needs { raw_socket: true, ipv6: false, selector: &none };
        let connect = Needs { raw_socket: false, ipv6: false, selector: &none };
        let reason = |needs: &Needs, fleet: &[FleetGroup]| waiting_reason(needs, fleet).unwrap_or_default();
        assert_eq!(reason(&syn, &[]), "no agent is connected");
        let connect_only = group(&[], false, true, 1);
        assert!(reason(&syn, std::slice::from_ref(&connect_only)).contains("1 connect-only"));
        assert_eq!(waiting_reason(&connect, std::slice::from_ref(&connect_only)), None);
        let in_eu = Needs { selector: &eu, ..connect };
        let drained = FleetGroup { draining: true, ..group(&[("site", "eu")], true, true, 1) };
        assert_eq!(
            reason(&in_eu, &[drained.clone(), group(&[("site", "us")], true, true, 2)]),
            "no connected agent can run this scan: 1 draining, 2 without the agent_selector labels {site=eu}"
        );
        assert_eq!(reason(&in_eu, std::slice::from_ref(&drained)), "no connected agent can run this scan: 1 draining");
        let v6 = Needs { ipv6: true, ..connect };
        assert!(reason(&v6, &[group(&[], true, false, 1)]).contains("1 without IPv6"));
        // Able but full: the scan waits its turn, and says so.
        let full = FleetGroup { busy: true, ..group(&[], true, true, 1) };
        assert_eq!(
            reason(&syn, std::slice::from_ref(&full)),
            "every agent that can run this scan is busy: 1 at its shard limit"
        );
        assert_eq!(
            reason(&syn, &[full.clone(), drained]),
            "every agent that can run this scan is busy: 1 at its shard limit; the others cannot run it: 1 draining"
        );
        assert_eq!(waiting_reason(&syn, &[full, group(&[], true, true, 1)]), None, "one has room");
    }
}
