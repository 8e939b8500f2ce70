//! Network memory: the current state of every port any scan found open,
//! and what changed between scans (docs/inventory.md).
//!
//! A background task on every controller folds committed result batches
//! into the inventory (one controller at a time: an advisory lock), so the
//! ingest path pays nothing for it. When a scan has ended and all its
//! batches are folded, its closures are decided from its shards'
//! checkpoints: a port open before closes only when this scan finished
//! probing it and found it not open - never because the scan covered other
//! ports or addresses, or stopped before reaching it.

use std::{collections::HashMap, net::IpAddr, time::Duration};

use crate::{
    notify::{Notice, Notifier},
    plans::ScanPlans,
    store::{
        ChangeKind, Covered, Finished, HostDelta, InventoryTx, Lagging, NewChange, Observed, PortRow, PortState, Store,
        StoreError,
    },
};
use chrono::Utc;
use portfleet_core::{ScanSpace, Service, backoff::Backoff};
use sqlx::types::Json;
use tokio::sync::broadcast::error::RecvError;
use tokio_util::sync::CancellationToken;

/// Result batches folded per pass (a batch holds at most a few thousand
/// results): one pass is one short transaction.
const BATCHES_PER_PASS: i32 = 32;
/// Inventory rows examined per query when closing a finished scan.
const CLOSE_PAGE: i64 = 5000;
/// Changes per `scan.changes` message.
pub const CHANGES_PER_EVENT: i64 = 1000;
/// How often the task looks for work without a notification.
const IDLE_PASS: Duration = Duration::from_secs(1);

/// Runs until `cancel`: folds, then closes finished scans.
pub async fn run(store: Store, plans: ScanPlans, notifier: Notifier, cancel: CancellationToken) {
    let mut notices = notifier.subscribe();
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let started = std::time::Instant::now();
        let wait = match pass(&store, &plans).await {
            // At most half the time folding while there is a backlog: the
            // inventory may lag a burst of results, ingest must not.
            Ok(true) => {
                backoff.reset();
                started.elapsed().min(Duration::from_secs(2))
            }
            Ok(false) => {
                backoff.reset();
                IDLE_PASS
            }
            Err(StoreError::Cancelled) => return,
            Err(e) => {
                let retry_in = backoff.next_delay();
                tracing::warn!(error = %e, ?retry_in, "cannot update the inventory; retrying");
                retry_in
            }
        };
        let woken = async {
            loop {
                match notices.recv().await {
                    Ok(Notice::Results(_) | Notice::ScanChanged(_) | Notice::Resync) | Err(RecvError::Lagged(_)) => {
                        return;
                    }
                    Ok(_) => {}
                    Err(RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        if wait < IDLE_PASS {
            // Work left: only the pause, not a notification, ends the wait.
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => continue,
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = woken => {
                // Let a burst of commits gather into one pass.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One transaction of work; `true` when there may be more.
pub async fn pass(store: &Store, plans: &ScanPlans) -> Result<bool, StoreError> {
    let Some(mut tx) = store.inventory_tx().await? else { return Ok(false) };
    let lagging = tx.lagging_shards(256).await?;
    let more = fold_batches(&mut tx, &lagging).await?;
    let mut closing = false;
    // Closures once everything committed is folded: a finished scan's
    // opens must be in before deciding what it did not see. One page of
    // candidates per transaction, so none is long.
    if !more && let Some(scan) = tx.finished_scans(1).await?.pop() {
        if close_page(&mut tx, plans, &scan).await? {
            tx.finish_scan(scan.id, CHANGES_PER_EVENT).await?;
        }
        closing = true;
    }
    tx.commit().await?;
    Ok(more || closing)
}

/// Batches `(from, to]` to fold now for each lagging shard, within the
/// pass's budget.
fn allot(lagging: &[Lagging]) -> Vec<(i64, i32, i32)> {
    let share = (BATCHES_PER_PASS / lagging.len().max(1) as i32).max(1);
    let mut left = BATCHES_PER_PASS;
    let mut out = Vec::new();
    for l in lagging {
        if left <= 0 {
            break;
        }
        let take = (l.committed - l.folded).min(share).min(left);
        out.push((l.shard_id, l.folded, l.folded + take));
        left -= take;
    }
    out
}

async fn fold_batches(tx: &mut InventoryTx, lagging: &[Lagging]) -> Result<bool, StoreError> {
    let work = allot(lagging);
    if work.is_empty() {
        return Ok(false);
    }
    let shards: Vec<i64> = work.iter().map(|w| w.0).collect();
    let from: Vec<i32> = work.iter().map(|w| w.1).collect();
    let to: Vec<i32> = work.iter().map(|w| w.2).collect();
    let t0 = std::time::Instant::now();
    let observed = tx.observed(&shards, &from, &to).await?;
    let t_observed = t0.elapsed();
    let mut keys: Vec<(IpAddr, i32)> = observed.iter().map(|o| (o.ip, o.port)).collect();
    keys.sort_unstable();
    keys.dedup();
    let known = tx.ports(&keys).await?;
    let t_known = t0.elapsed();
    let rows = observed.len();
    let folded = fold(known, observed);
    tx.put_ports(&folded.ports).await?;
    let t_ports = t0.elapsed();
    tx.put_changes(&folded.changes).await?;
    let t_changes = t0.elapsed();
    tx.put_hosts(&folded.hosts).await?;
    let t_hosts = t0.elapsed();
    tx.advance(&shards, &to).await?;
    tracing::debug!(rows, ?t_observed, ?t_known, ?t_ports, ?t_changes, ?t_hosts, total = ?t0.elapsed(), "folded");
    let done: i32 = work.iter().map(|w| w.2 - w.1).sum();
    let lag: i32 = lagging.iter().map(|l| l.committed - l.folded).sum();
    Ok(lag > done || lagging.len() == 256)
}

/// What one pass writes.
#[derive(Debug, Default)]
pub struct Folded {
    pub ports: Vec<PortRow>,
    pub changes: Vec<NewChange>,
    pub hosts: Vec<HostDelta>,
}

/// Applies open ports, in the order they were seen, to the rows they
/// touch. Ports of a host that answers everything (a SYN proxy or tarpit)
/// are not services and stay out.
pub fn fold(known: Vec<PortRow>, mut observed: Vec<Observed>) -> Folded {
    observed.retain(|o| !o.host_answers_everything && o.protocol == "tcp");
    observed.sort_by_key(|o| o.last_seen_at);
    let mut rows: HashMap<(IpAddr, i32), PortRow> = known.into_iter().map(|r| ((r.ip, r.port), r)).collect();
    let mut hosts: HashMap<IpAddr, HostDelta> = HashMap::new();
    let mut changes = Vec::new();
    for o in &observed {
        let key = (o.ip, o.port);
        let (row, change) = observe_open(rows.get(&key), o);
        let host = hosts.entry(o.ip).or_insert_with(|| HostDelta {
            ip: o.ip,
            hostnames: None,
            target_group: o.target_group.clone(),
            open_ports: 0,
            seen_at: o.last_seen_at,
        });
        host.seen_at = host.seen_at.max(o.last_seen_at);
        if o.hostname.is_some() {
            host.hostnames.clone_from(&o.hostname);
        }
        if let Some(c) = change {
            if c.kind == ChangeKind::Opened {
                host.open_ports += 1;
            }
            changes.push(c);
        }
        rows.insert(key, row);
    }
    let touched: std::collections::HashSet<(IpAddr, i32)> = observed.iter().map(|o| (o.ip, o.port)).collect();
    let mut ports: Vec<PortRow> = rows.into_iter().filter(|(k, _)| touched.contains(k)).map(|(_, r)| r).collect();
    ports.sort_by_key(|r| (r.ip, r.port));
    let mut hosts: Vec<HostDelta> = hosts.into_values().collect();
    hosts.sort_by_key(|h| h.ip);
    Folded { ports, changes, hosts }
}

/// A port seen open by `o`, given its row so far.
pub fn observe_open(row: Option<&PortRow>, o: &Observed) -> (PortRow, Option<NewChange>) {
    let service = o.service.as_ref().map(|s| s.0.clone());
    let change = |kind, previous, before: Option<Service>| NewChange {
        kind,
        ip: o.ip,
        port: o.port,
        at: o.last_seen_at,
        scan_id: o.scan_id,
        previous_scan_id: previous,
        target_group: o.target_group.clone(),
        hostname: o.hostname.clone(),
        before,
        after: service.clone(),
    };
    let Some(r) = row else {
        let row = PortRow {
            ip: o.ip,
            port: o.port,
            protocol: "tcp".into(),
            state: PortState::Open,
            first_open_at: o.last_seen_at,
            last_open_at: o.last_seen_at,
            open_scan_id: o.scan_id,
            last_probed_at: o.last_seen_at,
            last_scan_id: o.scan_id,
            changed_at: o.last_seen_at,
            service: o.service.clone(),
        };
        return (row, Some(change(ChangeKind::Opened, None, None)));
    };
    let mut next = r.clone();
    let newer = o.last_seen_at >= r.last_open_at;
    let mut out = None;
    // Reopened only by a sighting after the close: an older scan's
    // results folded late do not undo what a newer scan saw.
    if r.state != PortState::Open && o.last_seen_at > r.changed_at {
        next.state = PortState::Open;
        next.changed_at = o.last_seen_at;
        out = Some(change(ChangeKind::Opened, Some(r.last_scan_id), None));
    } else if r.state == PortState::Open
        && newer
        && r.open_scan_id != o.scan_id
        && let (Some(before), Some(after)) = (r.service.as_ref(), service.as_ref())
        && service_changed(&before.0, after)
    {
        out = Some(change(ChangeKind::ServiceChanged, Some(r.open_scan_id), Some(before.0.clone())));
    }
    if newer {
        next.last_open_at = o.last_seen_at;
        next.open_scan_id = o.scan_id;
        if let Some(s) = &service
            && !weaker(s, r.service.as_ref().map(|s| &s.0))
        {
            next.service = Some(Json(s.clone()));
        }
    }
    next.first_open_at = next.first_open_at.min(o.last_seen_at);
    if o.last_seen_at >= r.last_probed_at {
        next.last_probed_at = o.last_seen_at;
        next.last_scan_id = o.scan_id;
    }
    (next, out)
}

/// A port a finished scan probed (it was in the scan's space and below a
/// shard's checkpoint) without finding it open. It closes when it was last
/// seen open before the scan started; a sighting during the scan (by
/// another scan) wins.
pub fn observe_closed(r: &PortRow, scan: &Finished) -> (PortRow, Option<NewChange>) {
    let at = scan.finished_at.unwrap_or_else(Utc::now);
    let started = scan.started_at.unwrap_or(at);
    let mut next = r.clone();
    let mut out = None;
    if r.state == PortState::Open && r.last_open_at < started {
        next.state = PortState::Closed;
        next.changed_at = at;
        out = Some(NewChange {
            kind: ChangeKind::Closed,
            ip: r.ip,
            port: r.port,
            at,
            scan_id: scan.id,
            previous_scan_id: Some(r.open_scan_id),
            target_group: scan.target_group.clone(),
            hostname: None,
            before: r.service.as_ref().map(|s| s.0.clone()),
            after: None,
        });
    }
    if at >= r.last_probed_at {
        next.last_probed_at = at;
        next.last_scan_id = scan.id;
    }
    (next, out)
}

/// Whether a different thing answers: name, product, version or TLS
/// certificate. Guesses from the port number, and "unknown", say nothing
/// about what answers, so they never count as a change.
pub fn service_changed(before: &Service, after: &Service) -> bool {
    let vague = |s: &Service| s.method == "table" || s.name.is_empty() || s.name == "unknown";
    if vague(before) || vague(after) {
        return false;
    }
    let cert = |s: &Service| s.tls.as_ref().map(|t| t.sha256.clone());
    (&before.name, &before.product, &before.version) != (&after.name, &after.product, &after.version)
        || cert(before) != cert(after)
}

/// A port-number guess does not replace an identification.
fn weaker(new: &Service, old: Option<&Service>) -> bool {
    new.method == "table" && old.is_some_and(|o| o.method != "table")
}

/// Whether `pos` is a position the scan finished probing.
pub fn covered(shards: &[Covered], pos: u64) -> bool {
    let Ok(pos) = i64::try_from(pos) else { return false };
    let i = shards.partition_point(|s| s.start_index <= pos);
    i > 0 && {
        let s = shards[i - 1];
        pos < s.end_index && pos < s.checkpoint
    }
}

/// Decides one page of a finished scan's closures - inventory ports in its
/// space that it finished probing and has no result for - and records how
/// far it got. `true` when the scan is done.
async fn close_page(tx: &mut InventoryTx, plans: &ScanPlans, scan: &Finished) -> Result<bool, StoreError> {
    let Some(plan) = plans.get(scan.id).await? else { return Ok(true) };
    let space: &ScanSpace = &plan.space;
    let ranges = space.addresses().ranges();
    let Some(range) = usize::try_from(scan.close_range).ok().and_then(|i| ranges.get(i)) else { return Ok(true) };
    let after = scan.close_ip.zip(scan.close_port);
    let ports: Vec<i32> = space.ports().iter().map(i32::from).collect();
    let page = tx.ports_in(range.first(), range.last(), &ports, after, CLOSE_PAGE).await?;
    let shards = tx.covered(scan.id).await?;
    let probed: Vec<(&PortRow, i64)> = page
        .iter()
        .filter_map(|r| {
            let port = u16::try_from(r.port).ok()?;
            let pos = space.position_of(r.ip, port)?;
            covered(&shards, pos).then_some((r, pos as i64))
        })
        .collect();
    let positions: Vec<i64> = probed.iter().map(|p| p.1).collect();
    let open: std::collections::HashSet<i64> = tx.result_positions(scan.id, &positions).await?.into_iter().collect();
    let mut rows = Vec::new();
    let mut changes = Vec::new();
    let mut hosts: HashMap<IpAddr, HostDelta> = HashMap::new();
    for (r, pos) in probed {
        if open.contains(&pos) {
            continue;
        }
        let (row, change) = observe_closed(r, scan);
        if let Some(c) = change {
            let h = hosts.entry(r.ip).or_insert_with(|| HostDelta {
                ip: r.ip,
                hostnames: None,
                target_group: String::new(),
                open_ports: 0,
                seen_at: r.last_open_at,
            });
            h.open_ports -= 1;
            changes.push(c);
        }
        rows.push(row);
    }
    tx.put_ports(&rows).await?;
    tx.put_changes(&changes).await?;
    let mut hosts: Vec<HostDelta> = hosts.into_values().collect();
    hosts.sort_by_key(|h| h.ip);
    tx.put_hosts(&hosts).await?;
    let (next_range, next_after) = match page.last() {
        Some(last) if page.len() as i64 == CLOSE_PAGE => (scan.close_range, Some((last.ip, last.port))),
        _ => (scan.close_range + 1, None),
    };
    tx.close_progress(scan.id, next_range, next_after).await?;
    Ok(next_range as usize >= ranges.len())
}

#[cfg(test)]
mod tests {
    use chrono::DateTime;
    use uuid::Uuid;

    use super::*;

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000 + s, 0).unwrap()
    }

    fn scan(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn seen(scan_no: u128, port: i32, at: i64, svc: Option<Service>) -> Observed {
        Observed {
            shard_id: 1,
            scan_id: scan(scan_no),
            ip: "10.0.0.1".parse().unwrap(),
            port,
            protocol: "tcp".into(),
            hostname: None,
            last_seen_at: t(at),
            service: svc.map(Json),
            host_answers_everything: false,
            target_group: String::new(),
        }
    }

    fn ssh(version: &str) -> Service {
        Service {
            name: "ssh".into(),
            product: "OpenSSH".into(),
            version: version.into(),
            method: "probed".into(),
            ..Service::default()
        }
    }

    fn finished(n: u128, started: i64, ended: i64) -> Finished {
        Finished {
            id: scan(n),
            target_group: String::new(),
            started_at: Some(t(started)),
            finished_at: Some(t(ended)),
            close_range: 0,
            close_ip: None,
            close_port: None,
        }
    }

    #[test]
    fn a_first_sighting_opens_and_a_second_changes_nothing() {
        let f = fold(vec![], vec![seen(1, 22, 10, None)]);
        assert_eq!(f.changes.len(), 1);
        assert_eq!(f.changes[0].kind, ChangeKind::Opened);
        assert_eq!(f.changes[0].previous_scan_id, None);
        assert_eq!(f.hosts[0].open_ports, 1);
        let again = fold(f.ports, vec![seen(2, 22, 20, None)]);
        assert!(again.changes.is_empty());
        assert_eq!(again.ports[0].open_scan_id, scan(2));
        assert_eq!(again.ports[0].first_open_at, t(10));
        assert_eq!(again.hosts[0].open_ports, 0);
    }

    #[test]
    fn a_close_needs_a_scan_that_started_after_the_last_sighting() {
        let row = fold(vec![], vec![seen(1, 22, 10, None)]).ports.remove(0);
        // Started before the port was last seen open: says nothing.
        let (same, none) = observe_closed(&row, &finished(2, 5, 30));
        assert!(none.is_none());
        assert_eq!(same.state, PortState::Open);
        assert_eq!(same.last_scan_id, scan(2));
        let (closed, change) = observe_closed(&row, &finished(3, 15, 30));
        assert_eq!(closed.state, PortState::Closed);
        let change = change.unwrap();
        assert_eq!((change.kind, change.previous_scan_id), (ChangeKind::Closed, Some(scan(1))));
        // An older scan's results folded late do not reopen it...
        let late = fold(vec![closed.clone()], vec![seen(4, 22, 20, None)]);
        assert!(late.changes.is_empty());
        assert_eq!(late.ports[0].state, PortState::Closed);
        // ...a newer sighting does.
        let reopened = fold(vec![closed], vec![seen(5, 22, 40, None)]);
        assert_eq!(reopened.changes[0].kind, ChangeKind::Opened);
        assert_eq!(reopened.changes[0].previous_scan_id, Some(scan(3)));
        assert_eq!(reopened.hosts[0].open_ports, 1);
    }

    #[test]
    fn a_new_version_or_certificate_is_a_service_change_and_a_guess_is_not() {
        let row = fold(vec![], vec![seen(1, 22, 10, Some(ssh("8.9")))]).ports;
        let same = fold(row.clone(), vec![seen(2, 22, 20, Some(ssh("8.9")))]);
        assert!(same.changes.is_empty());
        let upgraded = fold(row.clone(), vec![seen(2, 22, 20, Some(ssh("9.6")))]);
        assert_eq!(upgraded.changes[0].kind, ChangeKind::ServiceChanged);
        assert_eq!(upgraded.changes[0].before.as_ref().unwrap().version, "8.9");
        assert_eq!(upgraded.changes[0].after.as_ref().unwrap().version, "9.6");
        let guess = Service { name: "ssh".into(), method: "table".into(), ..Service::default() };
        let guessed = fold(row, vec![seen(2, 22, 20, Some(guess))]);
        assert!(guessed.changes.is_empty());
        assert_eq!(guessed.ports[0].service.as_ref().unwrap().0.version, "8.9", "a guess keeps the identification");
        let mut a = ssh("1");
        let mut b = ssh("1");
        a.tls = Some(portfleet_core::service::Tls { sha256: "aa".into(), ..Default::default() });
        b.tls = Some(portfleet_core::service::Tls { sha256: "bb".into(), ..Default::default() });
        assert!(service_changed(&a, &b));
    }

    #[test]
    fn tarpit_ports_stay_out() {
        let mut o = seen(1, 22, 10, None);
        o.host_answers_everything = true;
        let f = fold(vec![], vec![o]);
        assert!(f.ports.is_empty() && f.changes.is_empty() && f.hosts.is_empty());
    }

    #[test]
    fn coverage_is_below_each_shards_checkpoint() {
        let shards = [
            Covered { start_index: 0, end_index: 10, checkpoint: 10 },
            Covered { start_index: 10, end_index: 20, checkpoint: 14 },
            Covered { start_index: 20, end_index: 30, checkpoint: 20 },
        ];
        let covered_at: Vec<u64> = (0..32).filter(|&p| covered(&shards, p)).collect();
        assert_eq!(covered_at, (0..14).collect::<Vec<_>>());
    }

    #[test]
    fn the_budget_spreads_over_lagging_shards() {
        let l = |id, folded, committed| Lagging { shard_id: id, folded, committed };
        let a = allot(&[l(1, 0, 100), l(2, 5, 6)]);
        assert_eq!(a, vec![(1, 0, 16), (2, 5, 6)]);
        let many: Vec<Lagging> = (0..40).map(|i| l(i, 0, 3)).collect();
        assert_eq!(allot(&many).len(), BATCHES_PER_PASS as usize);
    }
}
