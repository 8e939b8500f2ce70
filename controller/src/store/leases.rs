//! Shard leases: claiming work for agents, applying their frames under the
//! lease's fence, and returning lost work to the queue from its checkpoint.
//!
//! Every frame is applied with `... WHERE id = $shard AND lease_epoch =
//! $epoch AND state = 'leased' AND agent_id = $agent AND acked_seq = $seq -
//! 1`: a frame from a lost lease, from another agent, or out of order
//! changes nothing. Several controllers can share one database: claims use
//! `FOR UPDATE SKIP LOCKED`, so no shard is ever leased twice at once.

use std::{net::IpAddr, time::Duration};

use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction, types::Json};
use uuid::Uuid;

use super::{
    LeaseEpoch, LeaseOutcome, ScanEvent, ScanState, Seq, ShardId, ShardState, Store, StoreError, scans::Labels,
};
use crate::{
    notify::{self, Notice, NoticeKind},
    politeness::RateCaps,
};

/// What an agent can run, for matching it to scans.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AgentClass {
    pub raw_socket: bool,
    pub ipv6: bool,
    pub labels: Labels,
}

/// A freshly granted lease.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Grant {
    pub shard_id: ShardId,
    pub scan_id: Uuid,
    pub lease_epoch: LeaseEpoch,
    pub checkpoint: i64,
    pub end_index: i64,
}

/// What never changes about a scan once it is stored: what an agent needs
/// to rebuild its index space, and its rate.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ScanParams {
    pub id: Uuid,
    pub scan_type: String,
    pub ports: String,
    pub address_ranges: Vec<String>,
    pub retries: i32,
    pub seed: i64,
    pub probes_planned: i64,
    pub rate: i32,
    pub identify: bool,
    pub port_threshold: i32,
    /// The W3C `traceparent` of the span that created the scan, when traced.
    pub trace_parent: Option<String>,
    /// Addresses probed only on `limited_ports` (empty: none).
    pub limited_ranges: Vec<String>,
    pub limited_ports: String,
}

/// A name an address of a scan was resolved from (several joined by ',').
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ScanHost {
    pub scan_id: Uuid,
    pub ip: IpAddr,
    pub hostname: String,
}

/// A scan some agent is working on.
#[derive(Clone, Copy, Debug)]
pub struct LeasedScan {
    pub id: Uuid,
    pub leases: i64,
    pub rate: u32,
}

/// One open port reported by an agent, with its position in the scan's
/// index space (computed by the controller, which also proves that the
/// port belongs to the scan).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortRecord {
    pub position: i64,
    pub ip: IpAddr,
    pub port: i32,
    pub observed_at: DateTime<Utc>,
    /// `portfleet_core::Service` as JSON, when the agent identified it.
    pub service: Option<String>,
    pub host_answers_everything: bool,
}

/// The fence a frame must pass.
#[derive(Clone, Copy, Debug)]
pub struct Fence {
    pub shard_id: ShardId,
    pub lease_epoch: LeaseEpoch,
    pub agent_id: Uuid,
    pub seq: Seq,
}

/// The result of applying a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// Committed now.
    Done,
    /// Already committed earlier (a resend): ack it again.
    Duplicate,
    /// The lease is gone (expired, cancelled, finished, or re-leased).
    Stale,
    /// Not a lease of this agent at all.
    NotHeld,
    /// A sequence number was skipped.
    OutOfOrder,
    /// A result lies outside the lease's range of positions (a protocol
    /// violation): nothing of the frame was written.
    OutsideLease { position: i64, start: i64, end: i64 },
}

/// What a frame's fence learned about its lease.
#[derive(sqlx::FromRow)]
struct Passed {
    scan_id: Uuid,
    /// The shard's result-batch number (bumped for a results frame).
    batch: i32,
    /// Whether the scan has hostnames.
    named: bool,
    /// The shard's range of positions, `start..end`.
    start: i64,
    end: i64,
}

/// A shard's lease as a refused frame's fence reads it, to say why.
#[derive(sqlx::FromRow)]
struct FenceState {
    lease_epoch: LeaseEpoch,
    #[sqlx(try_from = "String")]
    state: ShardState,
    agent_id: Option<Uuid>,
    acked_seq: Seq,
}

/// A scan's lease count and rate, with the caps, as the rate pass reads
/// them.
#[derive(sqlx::FromRow)]
struct LeasedScanRow {
    scan_id: Uuid,
    leases: i64,
    rate: i32,
    per_host: i32,
    per_block: i32,
}

/// Progress an agent reports for a lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShardProgress {
    pub checkpoint: i64,
    pub sent: i64,
    pub open: i64,
    pub closed: i64,
    pub filtered: i64,
}

#[derive(sqlx::FromRow)]
struct FailedShard {
    scan_id: Uuid,
    failures: i32,
}

/// Whether a failed shard goes back to the queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// Until it has failed more than this many times; then the scan fails.
    UpTo(i32),
    /// Never: the scan fails now, with the reason as its error.
    Never,
}

/// What happened to a scan when one of its shards failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// Back in the queue from its checkpoint.
    Requeued,
    /// Failed too often: the scan failed.
    ScanFailed(Uuid),
    Stale,
}

/// A lease as the registry sees it now.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct LeaseState {
    pub id: ShardId,
    pub lease_epoch: LeaseEpoch,
    #[sqlx(try_from = "String")]
    pub state: ShardState,
    pub agent_id: Option<Uuid>,
}

/// A lease an agent resumes after reconnecting.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Adopted {
    pub id: ShardId,
    pub lease_epoch: LeaseEpoch,
    pub scan_id: Uuid,
    pub acked_seq: Seq,
}

/// A lease from the history table.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct LeaseRecord {
    pub shard_id: ShardId,
    pub lease_epoch: LeaseEpoch,
    pub agent_id: Uuid,
    pub controller_id: String,
    pub start_index: i64,
    pub leased_at: DateTime<Utc>,
    pub ended_at: Option<DateTime<Utc>>,
    pub outcome: Option<String>,
}

fn millis(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl Store {
    /// Leases up to `n` pending shards that an agent of `class` may run,
    /// by fair share (docs/protocol.md, "Scheduling"), and marks their
    /// scans running.
    #[tracing::instrument(name = "store.claim_shards", skip_all, fields(%agent_id, n))]
    pub async fn claim_shards(
        &self,
        agent_id: Uuid,
        controller_id: &str,
        class: &AgentClass,
        n: u32,
        ttl: Duration,
    ) -> Result<Vec<Grant>, StoreError> {
        crate::metrics::timed("claim_shards", async move {
            if n == 0 {
                return Ok(Vec::new());
            }
            // Weighted fair share by stride scheduling: the j-th next
            // pending shard of a scan costs pass + (j - 1) / priority, where
            // a scan's pass is never below the lowest pass of the scans
            // being served (those with live leases): a scan that waited
            // (new, or unable to run) joins level with them rather than
            // bursting. The cheapest go first, ties to the scan served
            // least recently. max_parallel_shards bounds j; max_agents keeps
            // out agents beyond the scan's limit. LIMIT comes after the
            // locks, so shards another claim holds are replaced, not lost.
            let grants = sqlx::query_as::<_, Grant>(
                "WITH live AS (
                SELECT scan_id, count(*) AS leased, count(DISTINCT agent_id) AS agents,
                       bool_or(agent_id = $1) AS mine
                FROM shards WHERE state = 'leased' GROUP BY scan_id
             ), floor AS (
                SELECT min(s.pass) AS v FROM scans s WHERE s.id IN (SELECT scan_id FROM live)
             ), eligible AS (
                SELECT s.id, s.priority, greatest(s.pass, coalesce((SELECT v FROM floor), s.pass)) AS pass,
                       s.last_leased_at,
                       CASE WHEN s.max_parallel_shards > 0
                            THEN greatest(s.max_parallel_shards - coalesce(l.leased, 0), 0) ELSE $6 END AS room
                FROM scans s LEFT JOIN live l ON l.scan_id = s.id
                WHERE s.state IN ('pending', 'running')
                  AND (s.scan_type = 'connect' OR $3 OR s.allow_connect_fallback)
                  AND (NOT s.has_ipv6 OR $4)
                  AND s.agent_selector <@ $5
                  AND (s.max_agents = 0 OR coalesce(l.mine, false) OR coalesce(l.agents, 0) < s.max_agents)
             ), ranked AS (
                SELECT p.id, e.pass + (p.j - 1)::float8 / e.priority AS cost, e.last_leased_at, e.id AS scan_id, p.j
                FROM eligible e, LATERAL (
                    SELECT sh.id, row_number() OVER (ORDER BY sh.shard_no) AS j
                    FROM shards sh WHERE sh.scan_id = e.id AND sh.state = 'pending'
                    ORDER BY sh.shard_no LIMIT least(e.room, $6)
                ) p
             ), picked AS (
                SELECT sh.id FROM ranked r JOIN shards sh ON sh.id = r.id
                WHERE sh.state = 'pending'
                ORDER BY r.cost, r.last_leased_at NULLS FIRST, r.scan_id, r.j
                LIMIT $6
                FOR UPDATE OF sh SKIP LOCKED
             ), leased AS (
                UPDATE shards sh
                SET state = 'leased', lease_epoch = sh.lease_epoch + 1, agent_id = $1, controller_id = $2,
                    lease_expires_at = now() + $7 * interval '1 millisecond', acked_seq = 0, updated_at = now()
                FROM picked WHERE sh.id = picked.id
                RETURNING sh.id, sh.scan_id, sh.lease_epoch, sh.checkpoint, sh.end_index
             ), history AS (
                INSERT INTO shard_leases (shard_id, lease_epoch, agent_id, controller_id, start_index)
                SELECT id, lease_epoch, $1, $2, checkpoint FROM leased
             )
             SELECT id AS shard_id, scan_id, lease_epoch, checkpoint, end_index FROM leased",
            )
            .bind(agent_id)
            .bind(controller_id)
            .bind(class.raw_socket)
            .bind(class.ipv6)
            .bind(Json(&class.labels))
            .bind(i64::from(n))
            .bind(millis(ttl))
            .fetch_all(&self.pool)
            .await?;
            if !grants.is_empty() {
                // The grants are committed: if their scans cannot be
                // marked, they go back to the queue rather than stay leased
                // to an agent that never hears of them.
                if let Err(e) = self.mark_served(&grants).await {
                    for g in &grants {
                        let _ = self.return_undelivered(g.shard_id, g.lease_epoch).await;
                    }
                    return Err(e);
                }
            }
            // A shard leased before (lease_epoch counts its leases) was
            // lost by an agent (expired, released, failed) and goes on.
            let again = grants.iter().filter(|g| g.lease_epoch.get() > 1).count();
            metrics::counter!("portfleet_lease_reassignments_total").increment(again as u64);
            Ok(grants)
        })
        .await
    }

    /// Marks the scans of fresh grants running (started ones notify `s:`,
    /// running ones `l:`: their shares change) and moves each one's pass on
    /// by its grants / priority, from no lower than the lowest pass of the
    /// other scans being served. A separate statement from the claim:
    /// claims lock shards, cancels lock the scan first, and both in one
    /// statement could deadlock; the scans are locked in id order, and a
    /// deadlock with another controller's pass is retried.
    async fn mark_served(&self, grants: &[Grant]) -> Result<(), StoreError> {
        // One entry per grant: each moves its scan's pass on.
        let granted: Vec<Uuid> = grants.iter().map(|g| g.scan_id).collect();
        let mut scans = granted.clone();
        scans.sort_unstable();
        scans.dedup();
        let mut attempt = 0;
        loop {
            let marked = sqlx::query(
                "WITH locked AS (
                    SELECT id FROM scans WHERE id = ANY($1) ORDER BY id FOR UPDATE
                 ), floor AS (
                    SELECT min(s.pass) AS v FROM scans s
                    WHERE s.id IN (SELECT scan_id FROM shards WHERE state = 'leased') AND s.id <> ALL($1)
                 ), g AS (
                    SELECT id, count(*) AS k FROM unnest($5::uuid[]) AS id GROUP BY id
                 ), served AS (
                    UPDATE scans s SET pass = greatest(s.pass, coalesce(f.v, s.pass)) + g.k::float8 / s.priority,
                        last_leased_at = now()
                    FROM g, floor f
                    WHERE s.id = g.id AND s.state = 'running' AND s.id IN (SELECT id FROM locked)
                 ), started AS (
                    UPDATE scans s SET state = 'running', started_at = coalesce(started_at, now()),
                        waiting_reason = NULL, updated_at = now(), last_leased_at = now(),
                        pass = greatest(s.pass, coalesce(f.v, s.pass)) + g.k::float8 / s.priority
                    FROM g, floor f
                    WHERE s.id = g.id AND s.state = 'pending' AND s.id IN (SELECT id FROM locked)
                    RETURNING s.id
                 )
                 SELECT pg_notify($2, $3 || id) FROM started
                 UNION ALL
                 SELECT pg_notify($2, $4 || id) FROM unnest($1::uuid[]) AS id
                 WHERE id NOT IN (SELECT id FROM started)",
            )
            .bind(&scans)
            .bind(notify::CHANNEL)
            .bind(NoticeKind::ScanChanged.prefix())
            .bind(NoticeKind::Leases.prefix())
            .bind(&granted)
            .execute(&self.pool)
            .await;
            match marked {
                Ok(_) => return Ok(()),
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    tracing::debug!(error = %e, attempt, "marking leased scans failed; retrying");
                    tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether some unfinished scan an agent of `class` could run has
    /// pending shards and a `max_agents` limit: claims then depend on the
    /// agent, not only on its class.
    pub async fn has_agent_limited_work(&self, class: &AgentClass) -> Result<bool, StoreError> {
        let limited = sqlx::query_scalar::<_, bool>(
            "SELECT EXISTS (
                SELECT 1 FROM scans s
                WHERE s.state IN ('pending', 'running') AND s.max_agents > 0
                  AND (s.scan_type = 'connect' OR $1 OR s.allow_connect_fallback)
                  AND (NOT s.has_ipv6 OR $2)
                  AND s.agent_selector <@ $3
                  AND EXISTS (SELECT 1 FROM shards sh WHERE sh.scan_id = s.id AND sh.state = 'pending')
             )",
        )
        .bind(class.raw_socket)
        .bind(class.ipv6)
        .bind(Json(&class.labels))
        .fetch_one(&self.pool)
        .await?;
        Ok(limited)
    }

    /// A scan's state now.
    pub async fn scan_state(&self, id: Uuid) -> Result<Option<ScanState>, StoreError> {
        let state = sqlx::query_scalar::<_, String>("SELECT state FROM scans WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        state.as_deref().map(ScanState::parse).transpose().map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    pub async fn shard_scan(&self, shard_id: ShardId) -> Result<Option<Uuid>, StoreError> {
        let id = sqlx::query_scalar::<_, Uuid>("SELECT scan_id FROM shards WHERE id = $1")
            .bind(shard_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(id)
    }

    /// Every scan with leases in force now, across every controller: its
    /// lease count and configured rate; with the politeness caps.
    #[tracing::instrument(name = "store.leased_scans", skip_all)]
    pub async fn leased_scans(&self) -> Result<(Vec<LeasedScan>, RateCaps), StoreError> {
        let rows = sqlx::query_as::<_, LeasedScanRow>(
            "SELECT sh.scan_id, count(*) AS leases, s.rate, coalesce(c.per_host, 0) AS per_host,
                    coalesce(c.per_block, 0) AS per_block
             FROM shards sh JOIN scans s ON s.id = sh.scan_id LEFT JOIN rate_caps c ON true
             WHERE sh.state = 'leased'
             GROUP BY sh.scan_id, s.rate, c.per_host, c.per_block
             ORDER BY sh.scan_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let caps = rows.first().map_or_else(RateCaps::default, |r| RateCaps {
            per_host: r.per_host.max(0) as u32,
            per_block: r.per_block.max(0) as u32,
        });
        let scans = rows
            .into_iter()
            .map(|r| LeasedScan { id: r.scan_id, leases: r.leases, rate: r.rate.max(1) as u32 })
            .collect();
        Ok((scans, caps))
    }

    /// Parameters of many scans in one query.
    pub async fn scan_params_many(&self, ids: &[Uuid]) -> Result<Vec<ScanParams>, StoreError> {
        let rows = sqlx::query_as::<_, ScanParams>(
            "SELECT id, scan_type, ports, address_ranges, retries, seed, probes_planned, rate, identify,
                    port_threshold, trace_parent, limited_ranges, limited_ports
             FROM scans WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The named addresses of many scans in one query (each scan has at
    /// most `ScanLimits::max_hostnames`).
    pub async fn scan_hosts_many(&self, ids: &[Uuid]) -> Result<Vec<ScanHost>, StoreError> {
        let rows = sqlx::query_as::<_, ScanHost>(
            "SELECT scan_id, ip, hostname FROM scan_hosts WHERE scan_id = ANY($1) ORDER BY scan_id, ip",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Takes the fence for a frame inside `tx`: passes only for the next
    /// frame of a live lease held by the agent, and then returns the scan,
    /// the shard's result-batch number (bumped when `batch` is set) and
    /// whether the scan has hostnames.
    async fn fence(
        tx: &mut Transaction<'_, Postgres>,
        f: &Fence,
        batch: bool,
    ) -> Result<Result<Passed, Applied>, StoreError> {
        let passed = sqlx::query_as::<_, Passed>(
            "UPDATE shards SET acked_seq = $4, updated_at = now(), result_batches = result_batches + $5
             WHERE id = $1 AND lease_epoch = $2 AND agent_id = $3 AND state = 'leased' AND acked_seq = $4 - 1
             RETURNING scan_id, result_batches AS batch,
                EXISTS (SELECT 1 FROM scan_hosts h WHERE h.scan_id = shards.scan_id) AS named,
                start_index AS start, end_index AS end",
        )
        .bind(f.shard_id)
        .bind(f.lease_epoch)
        .bind(f.agent_id)
        .bind(f.seq)
        .bind(i32::from(batch))
        .fetch_optional(&mut **tx)
        .await?;
        if let Some(passed) = passed {
            return Ok(Ok(passed));
        }
        let row =
            sqlx::query_as::<_, FenceState>("SELECT lease_epoch, state, agent_id, acked_seq FROM shards WHERE id = $1")
                .bind(f.shard_id)
                .fetch_optional(&mut **tx)
                .await?;
        Ok(Err(match row {
            None => Applied::NotHeld,
            Some(s) if s.lease_epoch > f.lease_epoch => Applied::Stale,
            Some(s) if s.lease_epoch < f.lease_epoch => Applied::NotHeld,
            Some(s) => {
                let ours = s.agent_id == Some(f.agent_id);
                match s.state {
                    ShardState::Leased if !ours => Applied::NotHeld,
                    ShardState::Leased if s.acked_seq >= f.seq => Applied::Duplicate,
                    ShardState::Leased => Applied::OutOfOrder,
                    ShardState::Done if s.acked_seq >= f.seq && ours => Applied::Duplicate,
                    _ => Applied::Stale,
                }
            }
        }))
    }

    /// Writes a batch of open ports in one statement, idempotently, and
    /// moves the lease's sequence on: both or neither.
    #[tracing::instrument(name = "store.apply_results", skip_all, fields(shard_id = %f.shard_id, seq = %f.seq, results = results.len()))]
    pub async fn apply_results(&self, f: &Fence, results: &[PortRecord]) -> Result<Applied, StoreError> {
        crate::metrics::timed("apply_results", async move {
            let mut tx = self.pool.begin().await?;
            let Passed { scan_id, batch, named, start, end } =
                match Self::fence(&mut tx, f, !results.is_empty()).await? {
                    Ok(passed) => passed,
                    Err(outcome) => {
                        tx.rollback().await?;
                        return Ok(outcome);
                    }
                };
            // A lease covers its shard's positions only: results elsewhere in
            // the scan would be written under another lease's name (and, being
            // first, would shadow the real ones).
            if let Some(r) = results.iter().find(|r| !(start..end).contains(&r.position)) {
                tx.rollback().await?;
                return Ok(Applied::OutsideLease { position: r.position, start, end });
            }
            let mut ingested = 0;
            if !results.is_empty() {
                let positions: Vec<i64> = results.iter().map(|r| r.position).collect();
                let ips: Vec<IpAddr> = results.iter().map(|r| r.ip).collect();
                let ports: Vec<i32> = results.iter().map(|r| r.port).collect();
                let seen: Vec<DateTime<Utc>> = results.iter().map(|r| r.observed_at).collect();
                let services: Vec<Option<&str>> = results.iter().map(|r| r.service.as_deref()).collect();
                let everything: Vec<bool> = results.iter().map(|r| r.host_answers_everything).collect();
                // DO NOTHING: an upsert's speculative path costs ~20% more per
                // row on this, the hottest statement; conflicts are rare
                // (resends, re-scans after failover) and handled below.
                // The hostname join only for scans that have names (most
                // have none, and the join is a hash over every batch).
                let sql = if named {
                    "WITH ins AS (
                    INSERT INTO results (scan_id, position, ip, port, protocol, state, hostname, first_seen_at,
                                         last_seen_at, shard_id, shard_batch, service, host_answers_everything)
                    SELECT $1, u.pos, u.ip, u.port, 'tcp', 'open', h.hostname, u.seen, u.seen, $5, $6,
                           u.svc::jsonb, u.every
                    FROM UNNEST($7::int8[], $2::inet[], $3::int4[], $4::timestamptz[], $8::text[], $9::bool[])
                        AS u(pos, ip, port, seen, svc, every)
                    LEFT JOIN scan_hosts h ON h.scan_id = $1 AND h.ip = u.ip
                    ON CONFLICT DO NOTHING
                    RETURNING 1
                 ), counted AS (
                    UPDATE shards SET open_count = open_count + (SELECT count(*) FROM ins)
                    WHERE id = $5
                    RETURNING (SELECT count(*) FROM ins) AS fresh
                 )
                 SELECT fresh FROM counted"
                } else {
                    "WITH ins AS (
                    INSERT INTO results (scan_id, position, ip, port, protocol, state, first_seen_at, last_seen_at,
                                         shard_id, shard_batch, service, host_answers_everything)
                    SELECT $1, u.pos, u.ip, u.port, 'tcp', 'open', u.seen, u.seen, $5, $6, u.svc::jsonb, u.every
                    FROM UNNEST($7::int8[], $2::inet[], $3::int4[], $4::timestamptz[], $8::text[], $9::bool[])
                        AS u(pos, ip, port, seen, svc, every)
                    ON CONFLICT DO NOTHING
                    RETURNING 1
                 ), counted AS (
                    UPDATE shards SET open_count = open_count + (SELECT count(*) FROM ins)
                    WHERE id = $5
                    RETURNING (SELECT count(*) FROM ins) AS fresh
                 )
                 SELECT fresh FROM counted"
                };
                let fresh: i64 = sqlx::query_scalar(sql)
                    .bind(scan_id)
                    .bind(&ips)
                    .bind(&ports)
                    .bind(&seen)
                    .bind(f.shard_id)
                    .bind(batch)
                    .bind(&positions)
                    .bind(&services)
                    .bind(&everything)
                    .fetch_one(&mut *tx)
                    .await?;
                ingested = fresh.max(0) as u64;
                if fresh > 0 {
                    super::notify(&mut tx, Notice::Results(scan_id)).await?;
                }
                if (fresh as usize) < results.len() {
                    // Seen before: only move the last observation on.
                    sqlx::query(
                        "UPDATE results r SET last_seen_at = u.seen
                     FROM UNNEST($2::int8[], $3::timestamptz[]) AS u(pos, seen)
                     WHERE r.scan_id = $1 AND r.position = u.pos AND r.last_seen_at < u.seen",
                    )
                    .bind(scan_id)
                    .bind(&positions)
                    .bind(&seen)
                    .execute(&mut *tx)
                    .await?;
                }
            }
            tx.commit().await?;
            // Rows new to the scan only: a resent batch counts nothing.
            metrics::counter!("portfleet_results_ingested_total").increment(ingested);
            Ok(Applied::Done)
        })
        .await
    }

    /// Records a checkpoint: every position below it is final and its
    /// results are in earlier, committed frames.
    #[tracing::instrument(name = "store.apply_progress", skip_all, fields(shard_id = %f.shard_id, seq = %f.seq))]
    pub async fn apply_progress(&self, f: &Fence, p: &ShardProgress) -> Result<Applied, StoreError> {
        crate::metrics::timed("apply_progress", async move {
            let mut tx = self.pool.begin().await?;
            if let Err(outcome) = Self::fence(&mut tx, f, false).await? {
                tx.rollback().await?;
                return Ok(outcome);
            }
            sqlx::query(
                "UPDATE shards SET checkpoint = greatest(checkpoint, least($2, end_index)),
                probes_sent = $3, closed_count = $4, filtered_count = $5
             WHERE id = $1",
            )
            .bind(f.shard_id)
            .bind(p.checkpoint)
            .bind(p.sent)
            .bind(p.closed)
            .bind(p.filtered)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(Applied::Done)
        })
        .await
    }

    /// Finishes a shard, and its scan when it was the last one.
    #[tracing::instrument(name = "store.apply_complete", skip_all, fields(shard_id = %f.shard_id, seq = %f.seq))]
    pub async fn apply_complete(&self, f: &Fence, p: &ShardProgress) -> Result<(Applied, Option<Uuid>), StoreError> {
        crate::metrics::timed("apply_complete", async move {
            let mut tx = self.pool.begin().await?;
            // The scan row first: two last shards finishing at once must not
            // each see the other still running.
            let scan_id = sqlx::query_scalar::<_, Uuid>(
                "SELECT s.id FROM scans s JOIN shards sh ON sh.scan_id = s.id WHERE sh.id = $1 FOR UPDATE OF s",
            )
            .bind(f.shard_id)
            .fetch_optional(&mut *tx)
            .await?;
            if scan_id.is_none() {
                tx.rollback().await?;
                return Ok((Applied::NotHeld, None));
            }
            if let Err(outcome) = Self::fence(&mut tx, f, false).await? {
                tx.rollback().await?;
                return Ok((outcome, None));
            }
            sqlx::query(
                "WITH done AS (
                UPDATE shards SET state = 'done', checkpoint = end_index, probes_sent = $3, closed_count = $4,
                    filtered_count = $5, lease_expires_at = NULL
                WHERE id = $1
                RETURNING id
             )
             UPDATE shard_leases SET ended_at = now(), outcome = 'done'
             WHERE shard_id = $1 AND lease_epoch = $2",
            )
            .bind(f.shard_id)
            .bind(f.lease_epoch)
            .bind(p.sent)
            .bind(p.closed)
            .bind(p.filtered)
            .execute(&mut *tx)
            .await?;
            let completed = sqlx::query_scalar::<_, Uuid>(
                "UPDATE scans s SET state = 'completed', finished_at = now(), updated_at = now(),
                probes_done = s.probes_planned,
                open_ports = (SELECT coalesce(sum(open_count), 0) FROM shards WHERE scan_id = s.id)
             WHERE s.id = (SELECT scan_id FROM shards WHERE id = $1) AND s.state = 'running'
               AND NOT EXISTS (SELECT 1 FROM shards WHERE scan_id = s.id AND state <> 'done')
             RETURNING s.id",
            )
            .bind(f.shard_id)
            .fetch_optional(&mut *tx)
            .await?;
            if let Some(id) = completed {
                Self::mark_answering_hosts(&mut tx, &[id]).await?;
                super::events::record(&mut tx, id, ScanEvent::Completed).await?;
                notify_scan(&mut tx, id).await?;
            }
            tx.commit().await?;
            super::events::count_finished(ScanEvent::Completed, u64::from(completed.is_some()));
            Ok((Applied::Done, completed))
        })
        .await
    }

    /// Marks every open port of an address that answered on more than its
    /// scan's `port_threshold` ports (a SYN proxy or tarpit): agents mark
    /// what one shard shows, this what the whole scan does. Skipped for a
    /// scan with no more open ports than the threshold in all.
    async fn mark_answering_hosts(tx: &mut Transaction<'_, Postgres>, scans: &[Uuid]) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE results r SET host_answers_everything = true
             FROM (
                SELECT res.scan_id, res.ip FROM results res JOIN scans s ON s.id = res.scan_id
                WHERE s.id = ANY($1) AND s.port_threshold > 0 AND s.open_ports > s.port_threshold
                GROUP BY res.scan_id, res.ip, s.port_threshold HAVING count(*) > s.port_threshold
             ) h
             WHERE r.scan_id = h.scan_id AND r.ip = h.ip AND NOT r.host_answers_everything",
        )
        .bind(scans)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Hands a lease back: the shard resumes from its checkpoint.
    pub async fn release_lease(
        &self,
        shard_id: ShardId,
        lease_epoch: LeaseEpoch,
        agent_id: Uuid,
    ) -> Result<bool, StoreError> {
        crate::metrics::timed("release_lease", async move {
            self.end_lease(shard_id, lease_epoch, Some(agent_id), LeaseOutcome::Released).await
        })
        .await
    }

    async fn end_lease(
        &self,
        shard_id: ShardId,
        lease_epoch: LeaseEpoch,
        agent_id: Option<Uuid>,
        outcome: LeaseOutcome,
    ) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "WITH back AS (
                UPDATE shards SET state = 'pending', agent_id = NULL, controller_id = NULL,
                    lease_expires_at = NULL, updated_at = now()
                WHERE id = $1 AND lease_epoch = $2 AND state = 'leased' AND ($3::uuid IS NULL OR agent_id = $3)
                RETURNING id
             )
             UPDATE shard_leases SET ended_at = now(), outcome = $4
             WHERE shard_id = $1 AND lease_epoch = $2 AND EXISTS (SELECT 1 FROM back)",
        )
        .bind(shard_id)
        .bind(lease_epoch)
        .bind(agent_id)
        .bind(outcome.as_str())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n > 0)
    }

    /// A lease that could not be delivered goes straight back.
    pub async fn return_undelivered(&self, shard_id: ShardId, lease_epoch: LeaseEpoch) -> Result<(), StoreError> {
        self.end_lease(shard_id, lease_epoch, None, LeaseOutcome::Undelivered).await?;
        Ok(())
    }

    /// Counts a failure; once `retry` gives up, the whole scan fails with
    /// `reason`, and its other shards are cancelled.
    pub async fn fail_shard(
        &self,
        shard_id: ShardId,
        lease_epoch: LeaseEpoch,
        agent_id: Uuid,
        reason: &str,
        retry: Retry,
    ) -> Result<FailOutcome, StoreError> {
        crate::metrics::timed("fail_shard", async move {
            let mut tx = self.pool.begin().await?;
            // Scan before shard, as everywhere: no lock-order deadlocks.
            sqlx::query("SELECT 1 FROM scans WHERE id = (SELECT scan_id FROM shards WHERE id = $1) FOR UPDATE")
                .bind(shard_id)
                .execute(&mut *tx)
                .await?;
            let row = sqlx::query_as::<_, FailedShard>(
                "UPDATE shards SET failures = failures + 1, last_error = $4, state = 'pending', agent_id = NULL,
                controller_id = NULL, lease_expires_at = NULL, updated_at = now()
             WHERE id = $1 AND lease_epoch = $2 AND agent_id = $3 AND state = 'leased'
             RETURNING scan_id, failures",
            )
            .bind(shard_id)
            .bind(lease_epoch)
            .bind(agent_id)
            .bind(reason)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(FailedShard { scan_id, failures }) = row else {
                tx.rollback().await?;
                return Ok(FailOutcome::Stale);
            };
            sqlx::query(
                "UPDATE shard_leases SET ended_at = now(), outcome = 'failed' WHERE shard_id = $1 AND lease_epoch = $2",
            )
            .bind(shard_id)
            .bind(lease_epoch)
            .execute(&mut *tx)
            .await?;
            let message = match retry {
                Retry::UpTo(max_failures) if failures <= max_failures => {
                    tx.commit().await?;
                    return Ok(FailOutcome::Requeued);
                }
                Retry::UpTo(_) => format!("shard {shard_id} failed {failures} times; last: {reason}"),
                Retry::Never => reason.to_string(),
            };
            let failed = sqlx::query_scalar::<_, Uuid>(
                "UPDATE scans SET state = 'failed', error = $2, finished_at = now(), updated_at = now()
             WHERE id = $1 AND state IN ('pending', 'running') RETURNING id",
            )
            .bind(scan_id)
            .bind(&message)
            .fetch_optional(&mut *tx)
            .await?;
            if failed.is_some() {
                sqlx::query(
                    "UPDATE shards SET state = CASE WHEN id = $2 THEN 'failed' ELSE 'cancelled' END, updated_at = now()
                 WHERE scan_id = $1 AND state IN ('pending', 'leased')",
                )
                .bind(scan_id)
                .bind(shard_id)
                .execute(&mut *tx)
                .await?;
                super::events::record(&mut tx, scan_id, ScanEvent::Failed).await?;
                notify_scan(&mut tx, scan_id).await?;
            }
            tx.commit().await?;
            super::events::count_finished(ScanEvent::Failed, u64::from(failed.is_some()));
            Ok(FailOutcome::ScanFailed(scan_id))
        })
        .await
    }

    /// Returns every lease past its expiry to the queue (from its
    /// checkpoint). Safe to run on every controller at once.
    #[tracing::instrument(name = "store.expire_leases", skip_all)]
    pub async fn expire_leases(&self) -> Result<u64, StoreError> {
        crate::metrics::timed("expire_leases", async move {
            let n = sqlx::query(
                "WITH expired AS (
                UPDATE shards SET state = 'pending', agent_id = NULL, controller_id = NULL,
                    lease_expires_at = NULL, updated_at = now()
                WHERE state = 'leased' AND lease_expires_at < now()
                RETURNING id, lease_epoch
             )
             UPDATE shard_leases l SET ended_at = now(), outcome = 'expired'
             FROM expired e WHERE l.shard_id = e.id AND l.lease_epoch = e.lease_epoch",
            )
            .execute(&self.pool)
            .await?
            .rows_affected();
            Ok(n)
        })
        .await
    }

    /// Keeps the leases of agents whose sessions live on this controller.
    pub async fn extend_leases(&self, controller_id: &str, agents: &[Uuid], ttl: Duration) -> Result<(), StoreError> {
        crate::metrics::timed("extend_leases", async move {
            if agents.is_empty() {
                return Ok(());
            }
            sqlx::query(
                "UPDATE shards SET lease_expires_at = now() + $3 * interval '1 millisecond'
             WHERE state = 'leased' AND controller_id = $1 AND agent_id = ANY($2)",
            )
            .bind(controller_id)
            .bind(agents)
            .bind(millis(ttl))
            .execute(&self.pool)
            .await?;
            Ok(())
        })
        .await
    }

    /// Takes over the leases an agent still holds after reconnecting (to
    /// this or another controller). Returns those that are still valid.
    pub async fn adopt_leases(
        &self,
        agent_id: Uuid,
        controller_id: &str,
        held: &[(ShardId, LeaseEpoch)],
        ttl: Duration,
    ) -> Result<Vec<Adopted>, StoreError> {
        if held.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<ShardId> = held.iter().map(|h| h.0).collect();
        let epochs: Vec<LeaseEpoch> = held.iter().map(|h| h.1).collect();
        let rows = sqlx::query_as::<_, Adopted>(
            "UPDATE shards sh SET controller_id = $2, lease_expires_at = now() + $5 * interval '1 millisecond'
             FROM UNNEST($3::int8[], $4::int8[]) AS h(id, epoch)
             WHERE sh.id = h.id AND sh.lease_epoch = h.epoch AND sh.agent_id = $1 AND sh.state = 'leased'
             RETURNING sh.id, sh.lease_epoch, sh.scan_id, sh.acked_seq",
        )
        .bind(agent_id)
        .bind(controller_id)
        .bind(&ids)
        .bind(&epochs)
        .bind(millis(ttl))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// After a session ends: its leases lapse after `grace` unless the
    /// agent comes back to resume them.
    pub async fn shorten_leases(&self, agent_id: Uuid, grace: Duration) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE shards SET lease_expires_at = least(lease_expires_at, now() + $2 * interval '1 millisecond')
             WHERE state = 'leased' AND agent_id = $1",
        )
        .bind(agent_id)
        .bind(millis(grace))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn lease_states(&self, shard_ids: &[ShardId]) -> Result<Vec<LeaseState>, StoreError> {
        let rows =
            sqlx::query_as::<_, LeaseState>("SELECT id, lease_epoch, state, agent_id FROM shards WHERE id = ANY($1)")
                .bind(shard_ids)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }

    /// Completes running scans whose shards are all done (a safety net for
    /// a completion that raced a controller crash).
    pub async fn complete_finished_scans(&self) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let completed: Vec<Uuid> = sqlx::query_scalar(
            "WITH completed AS (
                UPDATE scans s SET state = 'completed', finished_at = now(), updated_at = now(),
                    probes_done = s.probes_planned,
                    open_ports = (SELECT coalesce(sum(open_count), 0) FROM shards WHERE scan_id = s.id)
                WHERE s.state = 'running' AND NOT EXISTS (SELECT 1 FROM shards WHERE scan_id = s.id AND state <> 'done')
                RETURNING s.id
             ), events AS (
                INSERT INTO scan_events (scan_id, event) SELECT id, 'completed' FROM completed
             )
             SELECT id FROM completed, LATERAL (SELECT pg_notify($1, $2 || id)) AS n",
        )
        .bind(notify::CHANNEL)
        .bind(NoticeKind::ScanChanged.prefix())
        .fetch_all(&mut *tx)
        .await?;
        if !completed.is_empty() {
            Self::mark_answering_hosts(&mut tx, &completed).await?;
        }
        tx.commit().await?;
        super::events::count_finished(ScanEvent::Completed, completed.len() as u64);
        Ok(completed.len() as u64)
    }

    /// Refreshes the progress counters of running scans from their shards.
    pub async fn roll_up_progress(&self) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE scans s SET probes_done = a.done, open_ports = a.open, updated_at = now()
             FROM (
                SELECT sh.scan_id, sum(sh.checkpoint - sh.start_index)::bigint AS done,
                       sum(sh.open_count)::bigint AS open
                FROM shards sh JOIN scans r ON r.id = sh.scan_id AND r.state = 'running'
                GROUP BY sh.scan_id
             ) a
             WHERE s.id = a.scan_id AND (s.probes_done, s.open_ports) IS DISTINCT FROM (a.done, a.open)",
        )
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The lease history of a scan, oldest first.
    pub async fn lease_history(&self, scan_id: Uuid) -> Result<Vec<LeaseRecord>, StoreError> {
        let rows = sqlx::query_as::<_, LeaseRecord>(
            "SELECT l.shard_id, l.lease_epoch, l.agent_id, l.controller_id, l.start_index, l.leased_at,
                    l.ended_at, l.outcome
             FROM shard_leases l JOIN shards sh ON sh.id = l.shard_id
             WHERE sh.scan_id = $1 ORDER BY l.leased_at, l.shard_id",
        )
        .bind(scan_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

pub(super) async fn notify_scan(tx: &mut Transaction<'_, Postgres>, scan_id: Uuid) -> Result<(), StoreError> {
    super::notify(tx, Notice::ScanChanged(scan_id)).await
}
