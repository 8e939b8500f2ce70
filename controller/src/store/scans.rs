//! Scans, their shards and hostnames.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{Origin, Page, Paged, ScanEvent, ScanState, ShardState, Store, StoreError};
use crate::notify::{self, NoticeKind};

pub type Labels = std::collections::BTreeMap<String, String>;

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ScanRecord {
    pub id: Uuid,
    pub request_id: Option<String>,
    #[sqlx(try_from = "String")]
    pub state: ScanState,
    pub targets: Vec<String>,
    pub target_group: String,
    pub ports: String,
    pub scan_type: String,
    pub rate: i32,
    pub retries: i32,
    pub labels: Json<Labels>,
    pub agent_selector: Json<Labels>,
    pub allow_connect_fallback: bool,
    pub seed: i64,
    pub address_ranges: Vec<String>,
    pub address_count: i64,
    pub port_count: i32,
    pub probes_planned: i64,
    pub shard_count: i32,
    pub probes_done: i64,
    pub open_ports: i64,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub has_ipv6: bool,
    pub waiting_reason: Option<String>,
    #[sqlx(try_from = "String")]
    pub origin: Origin,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// The normalised request's fingerprint (`None` for scans stored before
    /// fingerprints were kept).
    pub request_fingerprint: Option<String>,
    /// Identify what answers on open ports.
    pub identify: bool,
    /// More open ports than this on one address mark it as answering
    /// everything; 0 for no limit.
    pub port_threshold: i32,
    /// Fair share weight, 1 to 10.
    pub priority: i16,
    /// 0: no limit.
    pub max_agents: i32,
    pub max_parallel_shards: i32,
    #[sqlx(flatten)]
    pub shaping: Shaping,
    /// Its deadline passed before it finished (it was cancelled).
    pub deadline_exceeded: bool,
    /// The schedule that fired it.
    pub schedule_id: Option<Uuid>,
}

/// How a request shaped its scan, as it asked (echoed back) and as the
/// plan applied it (`limited_*`).
#[derive(Clone, Debug, Default, sqlx::FromRow)]
pub struct Shaping {
    pub exclude: Vec<String>,
    pub exclude_ports: String,
    /// 0: both families; 4 or 6.
    pub ip_version: i16,
    pub scan_all_ips: bool,
    /// "all", "web" or "skip".
    pub cdn_policy: String,
    /// Addresses probed only on `limited_ports` (CDN edges, web ports).
    pub limited_ranges: Vec<String>,
    pub limited_ports: String,
    pub deadline: Option<DateTime<Utc>>,
}

/// `"<prefix> <every scans column> <suffix>"`, built at compile time because
/// sqlx takes only static SQL.
macro_rules! with_scan_columns {
    ($prefix:literal, $suffix:literal) => {
        concat!(
            $prefix,
            " id, request_id, state, targets, target_group, ports, scan_type, rate, \
            retries, labels, agent_selector, allow_connect_fallback, seed, address_ranges, address_count, \
            port_count, probes_planned, shard_count, probes_done, open_ports, error, created_at, \
            started_at, finished_at, updated_at, has_ipv6, waiting_reason, origin, reply_to, correlation_id, \
            request_fingerprint, identify, port_threshold, priority, max_agents, max_parallel_shards, \
            exclude, exclude_ports, ip_version, scan_all_ips, cdn_policy, limited_ranges, limited_ports, deadline, \
            deadline_exceeded, schedule_id ",
            $suffix
        )
    };
}

/// One scan of a stored batch: its row, and whether this call created
/// it (`false`: its request id already had a scan), or why it failed.
pub type Stored = Result<(ScanRecord, bool), StoreError>;

#[derive(Clone, Debug)]
pub struct NewScan {
    pub id: Uuid,
    pub request_id: Option<String>,
    pub targets: Vec<String>,
    pub target_group: String,
    pub ports: String,
    pub scan_type: &'static str,
    pub rate: i32,
    pub retries: i32,
    pub labels: Labels,
    pub agent_selector: Labels,
    pub allow_connect_fallback: bool,
    pub seed: i64,
    pub address_ranges: Vec<String>,
    pub address_count: i64,
    pub port_count: i32,
    pub probes_planned: i64,
    pub has_ipv6: bool,
    pub origin: Origin,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// See [`ScanRecord::request_fingerprint`].
    pub request_fingerprint: Option<String>,
    pub identify: bool,
    pub port_threshold: i32,
    pub priority: i32,
    pub max_agents: i32,
    pub max_parallel_shards: i32,
    /// The W3C `traceparent` the scan's later spans (each Assign's) are
    /// children of; `None` when the scan is not traced.
    pub trace_parent: Option<String>,
    pub shaping: Shaping,
    pub schedule_id: Option<Uuid>,
    pub shards: Vec<NewShard>,
    pub hostnames: Vec<(IpAddr, String)>,
}

#[derive(Clone, Copy, Debug)]
pub struct NewShard {
    pub start: i64,
    pub end: i64,
}

impl Store {
    /// Stores planned scans with their shards and hostnames in one
    /// statement (so one transaction, one commit, one notification for the
    /// whole batch). A scan whose request id another scan already holds is
    /// not written; that scan comes back instead, flagged `false`. Results
    /// are in input order. Nothing is stored, and `PolicyChanged` returned,
    /// unless `policy_version` is still the scope rules' version; the check
    /// holds the version (FOR SHARE) until the scans commit, so a policy
    /// change either waits for them (and its sweep sees them) or they see it.
    ///
    /// One statement stores the batch. When it fails for a reason other
    /// than the connection (a value the database refuses, say), the scans
    /// are stored one at a time so only the bad one fails: its error is in
    /// its place in the list. An `Err` of the whole call stored nothing.
    #[tracing::instrument(name = "store.insert_scans", skip_all, fields(scans = scans.len()))]
    pub async fn insert_scans(&self, scans: &[NewScan], policy_version: i64) -> Result<Vec<Stored>, StoreError> {
        crate::metrics::timed("insert_scans", async move {
        match self.insert_scan_batch(scans, policy_version).await {
            Ok(stored) => Ok(stored.into_iter().map(Ok).collect()),
            Err(e) if scans.len() > 1 && !e.is_transient() => {
                tracing::warn!(error = %e, scans = scans.len(), "storing a batch of scans failed; storing them one at a time");
                let mut out = Vec::with_capacity(scans.len());
                for scan in scans {
                    match self.insert_scan_batch(std::slice::from_ref(scan), policy_version).await {
                        Ok(mut one) => {
                            out.push(one.pop().ok_or_else(|| StoreError::Corrupt("no row for a stored scan".into())))
                        }
                        Err(e) if !e.is_transient() => out.push(Err(e)),
                        Err(e) => return Err(e),
                    }
                }
                Ok(out)
            }
            Err(e) => Err(e),
        }
    }).await
    }

    async fn insert_scan_batch(
        &self,
        scans: &[NewScan],
        policy_version: i64,
    ) -> Result<Vec<(ScanRecord, bool)>, StoreError> {
        if scans.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<serde_json::Value> = scans
            .iter()
            .map(|s| {
                serde_json::json!({
                    "id": s.id, "request_id": s.request_id, "targets": s.targets, "target_group": s.target_group,
                    "ports": s.ports, "scan_type": s.scan_type, "rate": s.rate, "retries": s.retries,
                    "labels": s.labels, "agent_selector": s.agent_selector,
                    "allow_connect_fallback": s.allow_connect_fallback, "seed": s.seed,
                    "address_ranges": s.address_ranges, "address_count": s.address_count,
                    "port_count": s.port_count, "probes_planned": s.probes_planned,
                    "shard_count": s.shards.len(), "has_ipv6": s.has_ipv6, "origin": s.origin.as_str(),
                    "reply_to": s.reply_to, "correlation_id": s.correlation_id,
                    "request_fingerprint": s.request_fingerprint,
                    "identify": s.identify, "port_threshold": s.port_threshold,
                    "priority": s.priority, "max_agents": s.max_agents,
                    "max_parallel_shards": s.max_parallel_shards, "trace_parent": s.trace_parent,
                    "exclude": s.shaping.exclude, "exclude_ports": s.shaping.exclude_ports,
                    "ip_version": s.shaping.ip_version, "scan_all_ips": s.shaping.scan_all_ips,
                    "cdn_policy": s.shaping.cdn_policy, "limited_ranges": s.shaping.limited_ranges,
                    "limited_ports": s.shaping.limited_ports, "deadline": s.shaping.deadline,
                    "schedule_id": s.schedule_id,
                })
            })
            .collect();
        let (mut shard_scan, mut shard_no, mut starts, mut ends) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut host_scan, mut host_ip, mut host_name) = (Vec::new(), Vec::new(), Vec::new());
        for s in scans {
            for (i, sh) in s.shards.iter().enumerate() {
                shard_scan.push(s.id);
                shard_no.push(i as i32);
                starts.push(sh.start);
                ends.push(sh.end);
            }
            for (ip, name) in &s.hostnames {
                host_scan.push(s.id);
                host_ip.push(*ip);
                host_name.push(name.as_str());
            }
        }
        let mut tx = self.pool.begin().await?;
        let version: i64 = sqlx::query_scalar("SELECT version FROM policy_state FOR SHARE").fetch_one(&mut *tx).await?;
        if version != policy_version {
            return Err(StoreError::PolicyChanged);
        }
        let inserted = sqlx::query_as::<_, ScanRecord>(with_scan_columns!(
            "WITH ins AS (
                INSERT INTO scans (id, request_id, targets, target_group, ports, scan_type, rate, retries,
                    labels, agent_selector, allow_connect_fallback, seed, address_ranges, address_count,
                    port_count, probes_planned, shard_count, has_ipv6, origin, reply_to, correlation_id,
                    request_fingerprint, identify, port_threshold, trace_parent, priority, max_agents,
                    max_parallel_shards, exclude, exclude_ports, ip_version, scan_all_ips, cdn_policy,
                    limited_ranges, limited_ports, deadline, schedule_id, pass)
                SELECT r.id, r.request_id, ARRAY(SELECT jsonb_array_elements_text(r.targets)), r.target_group,
                    r.ports, r.scan_type, r.rate, r.retries, r.labels, r.agent_selector, r.allow_connect_fallback,
                    r.seed, ARRAY(SELECT jsonb_array_elements_text(r.address_ranges)), r.address_count,
                    r.port_count, r.probes_planned, r.shard_count, r.has_ipv6, r.origin, r.reply_to,
                    r.correlation_id, r.request_fingerprint, r.identify, r.port_threshold, r.trace_parent,
                    r.priority, r.max_agents, r.max_parallel_shards,
                    ARRAY(SELECT jsonb_array_elements_text(r.exclude)), r.exclude_ports, r.ip_version,
                    r.scan_all_ips, r.cdn_policy, ARRAY(SELECT jsonb_array_elements_text(r.limited_ranges)),
                    r.limited_ports, r.deadline, r.schedule_id,
                    -- Fair share: a new scan starts level with the least served
                    -- of the scans being served (docs/protocol.md).
                    -- (else of the running ones: a stuck scan, never started,
                    -- does not count).
                    coalesce((SELECT min(pass) FROM scans WHERE state = 'running'
                              AND id IN (SELECT scan_id FROM shards WHERE state = 'leased')),
                             (SELECT min(pass) FROM scans WHERE state = 'running'), 0)
                FROM jsonb_to_recordset($1::jsonb) AS r(id uuid, request_id text, targets jsonb,
                    target_group text, ports text, scan_type text, rate int, retries int, labels jsonb,
                    agent_selector jsonb, allow_connect_fallback bool, seed bigint, address_ranges jsonb,
                    address_count bigint, port_count int, probes_planned bigint, shard_count int,
                    has_ipv6 bool, origin text, reply_to text, correlation_id text, request_fingerprint text,
                    identify bool, port_threshold int, trace_parent text, priority smallint, max_agents int,
                    max_parallel_shards int, exclude jsonb, exclude_ports text, ip_version smallint,
                    scan_all_ips bool, cdn_policy text, limited_ranges jsonb, limited_ports text,
                    deadline timestamptz, schedule_id uuid)
                ON CONFLICT ON CONSTRAINT scans_request_id_key DO NOTHING
                RETURNING *
             ), sh AS (
                INSERT INTO shards (scan_id, shard_no, start_index, end_index, checkpoint)
                SELECT u.scan, u.n, u.s, u.e, u.s FROM UNNEST($2::uuid[], $3::int4[], $4::int8[], $5::int8[])
                    AS u(scan, n, s, e)
                WHERE u.scan IN (SELECT id FROM ins)
             ), hosts AS (
                INSERT INTO scan_hosts (scan_id, ip, hostname)
                SELECT u.scan, u.ip, u.name FROM UNNEST($6::uuid[], $7::inet[], $8::text[]) AS u(scan, ip, name)
                WHERE u.scan IN (SELECT id FROM ins)
             ), events AS (
                INSERT INTO scan_events (scan_id, event) SELECT id, 'created' FROM ins
             ), woke AS (
                -- Schedulers on every controller wake up for new work.
                SELECT pg_notify($9, $10 || (SELECT min(id::text) FROM ins)) WHERE EXISTS (SELECT 1 FROM ins)
             )
             SELECT",
            "FROM ins, (SELECT count(*) FROM woke) AS w"
        ))
        .bind(serde_json::Value::Array(rows))
        .bind(&shard_scan)
        .bind(&shard_no)
        .bind(&starts)
        .bind(&ends)
        .bind(&host_scan)
        .bind(&host_ip)
        .bind(&host_name)
        .bind(notify::CHANNEL)
        .bind(NoticeKind::ScanCreated.prefix())
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let mut by_id: std::collections::HashMap<Uuid, ScanRecord> = inserted.into_iter().map(|r| (r.id, r)).collect();
        // Lost races on idempotency keys: the holders are committed.
        let missing: Vec<String> =
            scans.iter().filter(|s| !by_id.contains_key(&s.id)).filter_map(|s| s.request_id.clone()).collect();
        let mut existing: std::collections::HashMap<String, ScanRecord> = std::collections::HashMap::new();
        if !missing.is_empty() {
            let rows =
                sqlx::query_as::<_, ScanRecord>(with_scan_columns!("SELECT", "FROM scans WHERE request_id = ANY($1)"))
                    .bind(&missing)
                    .fetch_all(&self.pool)
                    .await?;
            existing = rows.into_iter().filter_map(|r| Some((r.request_id.clone()?, r))).collect();
        }
        scans
            .iter()
            .map(|s| match by_id.remove(&s.id) {
                Some(r) => Ok((r, true)),
                None => s
                    .request_id
                    .as_ref()
                    .and_then(|id| existing.get(id).cloned())
                    .map(|r| (r, false))
                    .ok_or_else(|| StoreError::Corrupt(format!("scan {} was neither written nor found", s.id))),
            })
            .collect()
    }

    /// Scans holding any of these idempotency keys.
    pub async fn scans_by_request_ids(&self, ids: &[String]) -> Result<Vec<ScanRecord>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows =
            sqlx::query_as::<_, ScanRecord>(with_scan_columns!("SELECT", "FROM scans WHERE request_id = ANY($1)"))
                .bind(ids)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }

    /// These scans, deleted ones too (for deliveries about them).
    pub async fn scans_any(&self, ids: &[Uuid]) -> Result<Vec<ScanRecord>, StoreError> {
        let rows = sqlx::query_as::<_, ScanRecord>(with_scan_columns!("SELECT", "FROM scans WHERE id = ANY($1)"))
            .bind(ids)
            .fetch_all(&self.pool)
            .await?;
        Ok(rows)
    }

    pub async fn get_scan(&self, id: Uuid) -> Result<Option<ScanRecord>, StoreError> {
        crate::metrics::timed("get_scan", async move {
            let row = sqlx::query_as::<_, ScanRecord>(with_scan_columns!(
                "SELECT",
                "FROM scans WHERE id = $1 AND deleted_at IS NULL"
            ))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
            Ok(row)
        })
        .await
    }

    /// Newest first.
    pub async fn list_scans(
        &self,
        state: Option<ScanState>,
        page: Page<Uuid>,
    ) -> Result<Paged<ScanRecord, Uuid>, StoreError> {
        crate::metrics::timed("list_scans", async move {
            let rows = sqlx::query_as::<_, ScanRecord>(with_scan_columns!(
                "SELECT",
                "FROM scans
             WHERE ($1::text IS NULL OR state = $1) AND id < $2 AND deleted_at IS NULL
             ORDER BY id DESC
             LIMIT $3"
            ))
            .bind(state.map(ScanState::as_str))
            .bind(page.after.unwrap_or(Uuid::max()))
            .bind(i64::from(page.limit) + 1)
            .fetch_all(&self.pool)
            .await?;
            Ok(Paged::from_rows(rows, page.limit, |s| s.id))
        })
        .await
    }

    /// Moves a pending or running scan and its unfinished shards to
    /// cancelled. Returns the updated scan, or `None` when the scan was not
    /// cancellable (unknown, or already over).
    pub async fn cancel_scan(&self, id: Uuid) -> Result<Option<ScanRecord>, StoreError> {
        crate::metrics::timed("cancel_scan", async move {
            let mut tx = self.pool.begin().await?;
            let row = sqlx::query_as::<_, ScanRecord>(with_scan_columns!(
                "UPDATE scans SET state = 'cancelled', finished_at = now(), updated_at = now()
             WHERE id = $1 AND state IN ('pending', 'running')
             RETURNING",
                ""
            ))
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?;
            if row.is_some() {
                stop_unfinished_shards(&mut tx, id, ScanEvent::Cancelled).await?;
            }
            tx.commit().await?;
            super::events::count_finished(ScanEvent::Cancelled, u64::from(row.is_some()));
            Ok(row)
        })
        .await
    }

    /// Cancels up to `limit` scans whose deadline has passed, keeping what
    /// they found and saying so (`deadline_exceeded`, `error`). Returns
    /// their ids. Safe on every controller at once (SKIP LOCKED).
    pub async fn expire_deadlines(&self, limit: i64) -> Result<Vec<Uuid>, StoreError> {
        crate::metrics::timed("expire_deadlines", async move {
            let mut tx = self.pool.begin().await?;
            let ids: Vec<Uuid> = sqlx::query_scalar(
                "UPDATE scans SET state = 'cancelled', deadline_exceeded = true, finished_at = now(),
                        updated_at = now(),
                        error = format('deadline %s passed with %s of %s probes done',
                                       to_char(deadline AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'),
                                       probes_done, probes_planned)
                 WHERE id IN (SELECT id FROM scans
                              WHERE deadline <= now() AND state IN ('pending', 'running')
                              ORDER BY deadline LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING id",
            )
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            for id in &ids {
                stop_unfinished_shards(&mut tx, *id, ScanEvent::Cancelled).await?;
            }
            tx.commit().await?;
            super::events::count_finished(ScanEvent::Cancelled, ids.len() as u64);
            Ok(ids)
        })
        .await
    }

    /// Fails a pending or running scan with `error` and stops its shards
    /// (a policy change put it out of scope). `false` if it was over.
    pub async fn fail_scan(&self, id: Uuid, error: &str) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let failed = sqlx::query_scalar::<_, Uuid>(
            "UPDATE scans SET state = 'failed', error = $2, finished_at = now(), updated_at = now()
             WHERE id = $1 AND state IN ('pending', 'running') RETURNING id",
        )
        .bind(id)
        .bind(error)
        .fetch_optional(&mut *tx)
        .await?;
        if failed.is_some() {
            stop_unfinished_shards(&mut tx, id, ScanEvent::Failed).await?;
        }
        tx.commit().await?;
        super::events::count_finished(ScanEvent::Failed, u64::from(failed.is_some()));
        Ok(failed.is_some())
    }

    /// Records why pending scans wait (or clears it with `None`).
    pub async fn set_waiting_reasons(&self, reasons: &[(Uuid, Option<String>)]) -> Result<(), StoreError> {
        if reasons.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = reasons.iter().map(|r| r.0).collect();
        let texts: Vec<Option<&str>> = reasons.iter().map(|r| r.1.as_deref()).collect();
        sqlx::query(
            "UPDATE scans s SET waiting_reason = r.reason
             FROM UNNEST($1::uuid[], $2::text[]) AS r(id, reason)
             WHERE s.id = r.id AND s.state = 'pending' AND s.waiting_reason IS DISTINCT FROM r.reason",
        )
        .bind(&ids)
        .bind(&texts)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Pending scans that still have pending shards (the oldest first).
    pub async fn waiting_scans(&self, limit: i64) -> Result<Vec<ScanRecord>, StoreError> {
        let rows = sqlx::query_as::<_, ScanRecord>(with_scan_columns!(
            "SELECT",
            "FROM scans WHERE state = 'pending' ORDER BY id LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

/// After a scan ended early (`event`: cancelled, failed): its unfinished
/// shards are cancelled, the event recorded, and the controllers holding
/// its leases tell their agents to stop.
async fn stop_unfinished_shards(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    id: Uuid,
    event: ScanEvent,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE shards SET state = $2, updated_at = now()
         WHERE scan_id = $1 AND state IN ('pending', 'leased')",
    )
    .bind(id)
    .bind(ShardState::Cancelled.as_str())
    .execute(&mut **tx)
    .await?;
    super::events::record(tx, id, event).await?;
    super::leases::notify_scan(tx, id).await
}
