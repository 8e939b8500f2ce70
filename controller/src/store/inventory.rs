//! The inventory's tables (migrations/0008): ports, hosts, changes, and the
//! cursors that say how much of each shard's results is folded in. Every
//! write happens inside an [`InventoryTx`], which holds the fleet-wide
//! advisory lock: one controller folds at a time, so what a pass reads of
//! the inventory is what it overwrites.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use portfleet_core::Service;
use serde::{Deserialize, Serialize};
use sqlx::{Postgres, Transaction, types::Json};
use uuid::Uuid;

use super::{ChangeKind, Page, Paged, PortState, Store, StoreError};

/// The advisory lock key of inventory writers ("pf-inv").
const LOCK: i64 = 0x7066_2d69_6e76;

/// One port's current state.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct PortRow {
    pub ip: IpAddr,
    pub port: i32,
    pub protocol: String,
    #[sqlx(try_from = "String")]
    pub state: PortState,
    pub first_open_at: DateTime<Utc>,
    pub last_open_at: DateTime<Utc>,
    pub open_scan_id: Uuid,
    pub last_probed_at: DateTime<Utc>,
    pub last_scan_id: Uuid,
    pub changed_at: DateTime<Utc>,
    pub service: Option<Json<Service>>,
}

/// A change to record.
#[derive(Clone, Debug, PartialEq)]
pub struct NewChange {
    pub kind: ChangeKind,
    pub ip: IpAddr,
    pub port: i32,
    pub at: DateTime<Utc>,
    pub scan_id: Uuid,
    pub previous_scan_id: Option<Uuid>,
    pub target_group: String,
    pub hostname: Option<String>,
    pub before: Option<Service>,
    pub after: Option<Service>,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ChangeRecord {
    pub id: i64,
    #[sqlx(try_from = "String")]
    pub kind: ChangeKind,
    pub ip: IpAddr,
    pub protocol: String,
    pub port: i32,
    pub at: DateTime<Utc>,
    pub scan_id: Uuid,
    pub previous_scan_id: Option<Uuid>,
    pub hostname: Option<String>,
    pub service_before: Option<Json<Service>>,
    pub service_after: Option<Json<Service>>,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct HostRecord {
    pub ip: IpAddr,
    pub hostnames: Vec<String>,
    pub target_groups: Vec<String>,
    pub open_ports: i32,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}

/// A host's summary to merge into `inventory_hosts`.
#[derive(Clone, Debug, PartialEq)]
pub struct HostDelta {
    pub ip: IpAddr,
    /// Names joined by ',' (as results carry them), if any.
    pub hostnames: Option<String>,
    pub target_group: String,
    /// Ports that opened minus ports that closed.
    pub open_ports: i32,
    pub seen_at: DateTime<Utc>,
}

/// One committed open port, as the fold reads it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Observed {
    pub shard_id: i64,
    pub scan_id: Uuid,
    pub ip: IpAddr,
    pub port: i32,
    pub protocol: String,
    pub hostname: Option<String>,
    pub last_seen_at: DateTime<Utc>,
    pub service: Option<Json<Service>>,
    pub host_answers_everything: bool,
    pub target_group: String,
}

/// A shard with result batches not folded yet.
#[derive(Clone, Copy, Debug, sqlx::FromRow)]
pub struct Lagging {
    pub shard_id: i64,
    pub folded: i32,
    pub committed: i32,
}

/// A finished scan whose closures are still to decide, and how far
/// deciding them has got.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct Finished {
    pub id: Uuid,
    pub target_group: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub close_range: i32,
    pub close_ip: Option<IpAddr>,
    pub close_port: Option<i32>,
}

/// A shard's finished part: positions `start..checkpoint` are final.
#[derive(Clone, Copy, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct Covered {
    pub start_index: i64,
    pub end_index: i64,
    pub checkpoint: i64,
}

#[derive(Clone, Debug, Default)]
pub struct HostFilter {
    pub cidr: Option<IpNet>,
    pub hostname: Option<String>,
    pub target_group: Option<String>,
    pub open_port: Option<i32>,
    pub seen_since: Option<DateTime<Utc>>,
}

#[derive(Clone, Debug, Default)]
pub struct ChangeFilter {
    pub since: Option<DateTime<Utc>>,
    pub after_scan: Option<Uuid>,
    pub scan: Option<Uuid>,
    pub cidr: Option<IpNet>,
    pub port: Option<i32>,
    pub target_group: Option<String>,
    pub kind: Option<ChangeKind>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKey {
    pub ip: IpAddr,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeKey {
    pub id: i64,
}

/// (first, last) address of a block, for `BETWEEN` on an inet index.
pub(super) fn bounds(net: Option<IpNet>) -> (Option<IpAddr>, Option<IpAddr>) {
    net.map_or((None, None), |n| (Some(n.network()), Some(n.broadcast())))
}

/// A transaction holding the inventory lock.
pub struct InventoryTx {
    tx: Transaction<'static, Postgres>,
}

impl std::fmt::Debug for InventoryTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InventoryTx")
    }
}

impl Store {
    /// Begins an inventory transaction, or `None` when another controller
    /// holds the lock (it is doing the work).
    pub async fn inventory_tx(&self) -> Result<Option<InventoryTx>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)").bind(LOCK).fetch_one(&mut *tx).await?;
        if !locked {
            tx.rollback().await?;
            return Ok(None);
        }
        Ok(Some(InventoryTx { tx }))
    }

    /// By address; `hostname` and `target_group` match exactly.
    pub async fn list_hosts(
        &self,
        f: &HostFilter,
        page: Page<HostKey>,
    ) -> Result<Paged<HostRecord, HostKey>, StoreError> {
        crate::metrics::timed("list_hosts", async move {
            let (lo, hi) = bounds(f.cidr);
            let rows = sqlx::query_as::<_, HostRecord>(
                "SELECT h.ip, h.hostnames, h.target_groups, h.open_ports, h.first_seen_at, h.last_seen_at
             FROM inventory_hosts h
             WHERE ($1::inet IS NULL OR h.ip > $1)
               AND ($2::inet IS NULL OR h.ip BETWEEN $2 AND $3)
               AND ($4::text IS NULL OR lower($4) = ANY (h.hostnames))
               AND ($5::text IS NULL OR $5 = ANY (h.target_groups))
               AND ($6::int4 IS NULL OR EXISTS (
                    SELECT 1 FROM inventory_ports p
                    WHERE p.ip = h.ip AND p.port = $6 AND p.protocol = 'tcp' AND p.state = 'open'))
               AND ($7::timestamptz IS NULL OR h.last_seen_at >= $7)
             ORDER BY h.ip LIMIT $8",
            )
            .bind(page.after.map(|k| k.ip))
            .bind(lo)
            .bind(hi)
            .bind(f.hostname.as_deref())
            .bind(f.target_group.as_deref())
            .bind(f.open_port)
            .bind(f.seen_since)
            .bind(i64::from(page.limit) + 1)
            .fetch_all(&self.pool)
            .await?;
            Ok(Paged::from_rows(rows, page.limit, |h| HostKey { ip: h.ip }))
        })
        .await
    }

    pub async fn get_host(&self, ip: IpAddr) -> Result<Option<(HostRecord, Vec<PortRow>)>, StoreError> {
        crate::metrics::timed("get_host", async move {
            let host = sqlx::query_as::<_, HostRecord>(
                "SELECT ip, hostnames, target_groups, open_ports, first_seen_at, last_seen_at
             FROM inventory_hosts WHERE ip = $1",
            )
            .bind(ip)
            .fetch_optional(&self.pool)
            .await?;
            let Some(host) = host else { return Ok(None) };
            let ports = sqlx::query_as::<_, PortRow>(
                "SELECT ip, port, protocol, state, first_open_at, last_open_at, open_scan_id, last_probed_at,
                    last_scan_id, changed_at, service
             FROM inventory_ports WHERE ip = $1 ORDER BY port, protocol LIMIT 65536",
            )
            .bind(ip)
            .fetch_all(&self.pool)
            .await?;
            Ok(Some((host, ports)))
        })
        .await
    }

    /// Newest first. Only the filters given are in the statement: with
    /// `($n IS NULL OR ...)` for each, a generic plan could not use the
    /// (ip, id) index for an address block, and would walk the whole table
    /// backwards for a small one.
    pub async fn list_changes(
        &self,
        f: &ChangeFilter,
        page: Page<ChangeKey>,
    ) -> Result<Paged<ChangeRecord, ChangeKey>, StoreError> {
        crate::metrics::timed("list_changes", async move {
            let mut q = sqlx::QueryBuilder::<Postgres>::new(
                "SELECT id, kind, ip, protocol, port, at, scan_id, previous_scan_id, hostname, service_before,
                    service_after
             FROM inventory_changes WHERE id < ",
            );
            q.push_bind(page.after.map_or(i64::MAX, |k| k.id));
            if let Some(since) = f.since {
                q.push(" AND at >= ").push_bind(since);
            }
            if let Some(after) = f.after_scan {
                q.push(" AND scan_id > ").push_bind(after);
            }
            if let Some(scan) = f.scan {
                q.push(" AND scan_id = ").push_bind(scan);
            }
            if let (Some(lo), Some(hi)) = bounds(f.cidr) {
                q.push(" AND ip BETWEEN ").push_bind(lo).push(" AND ").push_bind(hi);
            }
            if let Some(port) = f.port {
                q.push(" AND port = ").push_bind(port);
            }
            if let Some(group) = &f.target_group {
                q.push(" AND target_group = ").push_bind(group.clone());
            }
            if let Some(kind) = f.kind {
                q.push(" AND kind = ").push_bind(kind.as_str());
            }
            // For a small block, `id + 0` keeps the planner off the primary
            // key's order, which it would walk backwards filtering (it assumes
            // a block's changes are spread over all ids): the (ip, id) index
            // and a sort of the block's few thousand rows are far cheaper.
            let small_block = f.cidr.is_some_and(|n| n.max_prefix_len() - n.prefix_len() <= 12);
            q.push(if small_block { " ORDER BY id + 0 DESC LIMIT " } else { " ORDER BY id DESC LIMIT " });
            q.push_bind(i64::from(page.limit) + 1);
            let rows = q.build_query_as::<ChangeRecord>().fetch_all(&self.pool).await?;
            Ok(Paged::from_rows(rows, page.limit, |c| ChangeKey { id: c.id }))
        })
        .await
    }

    /// A scan's shards by start position (what it finished probing).
    pub async fn coverage(&self, scan_id: Uuid) -> Result<Vec<Covered>, StoreError> {
        let rows = sqlx::query_as::<_, Covered>(
            "SELECT start_index, end_index, checkpoint FROM shards WHERE scan_id = $1 ORDER BY start_index",
        )
        .bind(scan_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// How many open results a scan has.
    pub async fn open_count(&self, scan_id: Uuid) -> Result<i64, StoreError> {
        let n = sqlx::query_scalar("SELECT count(*) FROM results WHERE scan_id = $1 AND state = 'open'")
            .bind(scan_id)
            .fetch_one(&self.pool)
            .await?;
        Ok(n)
    }

    /// The open (ip, port) pairs of exactly one of two scans, by address
    /// and port, with `true` for those of `a`. Streamed: a diff of two
    /// million-result scans never sits in memory.
    pub fn one_sided(
        &self,
        a: Uuid,
        b: Uuid,
    ) -> impl futures::Stream<Item = Result<(IpAddr, i32, bool), StoreError>> + Send + '_ {
        use futures::TryStreamExt;
        sqlx::query_as::<_, (IpAddr, i32, bool)>(
            "SELECT coalesce(x.ip, y.ip) AS ip, coalesce(x.port, y.port) AS port, x.ip IS NOT NULL AS in_a
             FROM (SELECT ip, port FROM results WHERE scan_id = $1 AND state = 'open') x
             FULL JOIN (SELECT ip, port FROM results WHERE scan_id = $2 AND state = 'open') y
                 ON x.ip = y.ip AND x.port = y.port
             WHERE x.ip IS NULL OR y.ip IS NULL
             ORDER BY 1, 2",
        )
        .bind(a)
        .bind(b)
        .fetch(&self.pool)
        .map_err(StoreError::from)
    }

    /// Changes each kind counts for a scan.
    pub async fn change_counts(&self, scan_id: Uuid) -> Result<Vec<(String, i64)>, StoreError> {
        let rows = sqlx::query_as::<_, (String, i64)>(
            "SELECT kind, count(*) FROM inventory_changes WHERE scan_id = $1 GROUP BY kind",
        )
        .bind(scan_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}

impl InventoryTx {
    /// Shards of scans not yet inventoried with batches to fold, by id.
    pub async fn lagging_shards(&mut self, limit: i64) -> Result<Vec<Lagging>, StoreError> {
        let rows = sqlx::query_as::<_, Lagging>(
            "SELECT sh.id AS shard_id, coalesce(c.batches, 0) AS folded, sh.result_batches AS committed
             FROM scans s
             JOIN shards sh ON sh.scan_id = s.id
             LEFT JOIN inventory_cursors c ON c.shard_id = sh.id
             WHERE NOT s.inventoried AND sh.result_batches > coalesce(c.batches, 0)
             ORDER BY sh.id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows)
    }

    /// The open ports of batches `(from, to]` of each shard.
    pub async fn observed(&mut self, shards: &[i64], from: &[i32], to: &[i32]) -> Result<Vec<Observed>, StoreError> {
        let rows = sqlx::query_as::<_, Observed>(
            "SELECT r.shard_id, r.scan_id, r.ip, r.port, r.protocol, r.hostname, r.last_seen_at, r.service,
                    r.host_answers_everything, s.target_group
             FROM UNNEST($1::int8[], $2::int4[], $3::int4[]) AS u(shard_id, from_b, to_b)
             JOIN results r ON r.shard_id = u.shard_id AND r.shard_batch > u.from_b AND r.shard_batch <= u.to_b
             JOIN scans s ON s.id = r.scan_id
             WHERE r.state = 'open'",
        )
        .bind(shards)
        .bind(from)
        .bind(to)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows)
    }

    /// The inventory rows of these (ip, port) pairs (tcp).
    pub async fn ports(&mut self, keys: &[(IpAddr, i32)]) -> Result<Vec<PortRow>, StoreError> {
        let ips: Vec<IpAddr> = keys.iter().map(|k| k.0).collect();
        let ports: Vec<i32> = keys.iter().map(|k| k.1).collect();
        let rows = sqlx::query_as::<_, PortRow>(
            "SELECT p.ip, p.port, p.protocol, p.state, p.first_open_at, p.last_open_at, p.open_scan_id,
                    p.last_probed_at, p.last_scan_id, p.changed_at, p.service
             FROM UNNEST($1::inet[], $2::int4[]) AS u(ip, port)
             JOIN inventory_ports p ON p.ip = u.ip AND p.port = u.port AND p.protocol = 'tcp'",
        )
        .bind(&ips)
        .bind(&ports)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows)
    }

    /// Inventory rows inside `lo..=hi` on one of `ports`, after `after`
    /// in (ip, port) order: a finished scan's candidates for closing.
    pub async fn ports_in(
        &mut self,
        lo: IpAddr,
        hi: IpAddr,
        ports: &[i32],
        after: Option<(IpAddr, i32)>,
        limit: i64,
    ) -> Result<Vec<PortRow>, StoreError> {
        let rows = sqlx::query_as::<_, PortRow>(
            "SELECT ip, port, protocol, state, first_open_at, last_open_at, open_scan_id, last_probed_at,
                    last_scan_id, changed_at, service
             FROM inventory_ports
             WHERE ip BETWEEN $1 AND $2 AND port = ANY ($3) AND protocol = 'tcp'
               AND ($4::inet IS NULL OR (ip, port) > ($4, $5))
             ORDER BY ip, port LIMIT $6",
        )
        .bind(lo)
        .bind(hi)
        .bind(ports)
        .bind(after.map(|a| a.0))
        .bind(after.map_or(0, |a| a.1))
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows)
    }

    /// Which of `positions` the scan has a result at.
    pub async fn result_positions(&mut self, scan_id: Uuid, positions: &[i64]) -> Result<Vec<i64>, StoreError> {
        let rows = sqlx::query_scalar(
            "SELECT r.position FROM results r
             WHERE r.scan_id = $1 AND r.position = ANY ($2)",
        )
        .bind(scan_id)
        .bind(positions)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows)
    }

    /// Writes rows (inserting or replacing each).
    pub async fn put_ports(&mut self, rows: &[PortRow]) -> Result<(), StoreError> {
        if rows.is_empty() {
            return Ok(());
        }
        let col = |f: fn(&PortRow) -> DateTime<Utc>| rows.iter().map(f).collect::<Vec<_>>();
        let ips: Vec<IpAddr> = rows.iter().map(|r| r.ip).collect();
        let ports: Vec<i32> = rows.iter().map(|r| r.port).collect();
        let states: Vec<&str> = rows.iter().map(|r| r.state.as_str()).collect();
        let open_scans: Vec<Uuid> = rows.iter().map(|r| r.open_scan_id).collect();
        let last_scans: Vec<Uuid> = rows.iter().map(|r| r.last_scan_id).collect();
        let services: Vec<Option<String>> =
            rows.iter().map(|r| r.service.as_ref().and_then(|s| serde_json::to_string(&s.0).ok())).collect();
        sqlx::query(
            "INSERT INTO inventory_ports AS p (ip, port, protocol, state, first_open_at, last_open_at, open_scan_id,
                                               last_probed_at, last_scan_id, changed_at, service)
             SELECT u.ip, u.port, 'tcp', u.state, u.first_open, u.last_open, u.open_scan, u.probed, u.last_scan,
                    u.changed, u.svc::jsonb
             FROM UNNEST($1::inet[], $2::int4[], $3::text[], $4::timestamptz[], $5::timestamptz[], $6::uuid[],
                         $7::timestamptz[], $8::uuid[], $9::timestamptz[], $10::text[])
                 AS u(ip, port, state, first_open, last_open, open_scan, probed, last_scan, changed, svc)
             ORDER BY u.ip, u.port
             ON CONFLICT (ip, port, protocol) DO UPDATE SET
                state = excluded.state, first_open_at = excluded.first_open_at, last_open_at = excluded.last_open_at,
                open_scan_id = excluded.open_scan_id, last_probed_at = excluded.last_probed_at,
                last_scan_id = excluded.last_scan_id, changed_at = excluded.changed_at, service = excluded.service",
        )
        .bind(&ips)
        .bind(&ports)
        .bind(&states)
        .bind(col(|r| r.first_open_at))
        .bind(col(|r| r.last_open_at))
        .bind(&open_scans)
        .bind(col(|r| r.last_probed_at))
        .bind(&last_scans)
        .bind(col(|r| r.changed_at))
        .bind(&services)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn put_changes(&mut self, changes: &[NewChange]) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let json = |s: &Option<Service>| s.as_ref().and_then(|s| serde_json::to_string(s).ok());
        let kinds: Vec<&str> = changes.iter().map(|c| c.kind.as_str()).collect();
        let ips: Vec<IpAddr> = changes.iter().map(|c| c.ip).collect();
        let ports: Vec<i32> = changes.iter().map(|c| c.port).collect();
        let ats: Vec<DateTime<Utc>> = changes.iter().map(|c| c.at).collect();
        let scans: Vec<Uuid> = changes.iter().map(|c| c.scan_id).collect();
        let previous: Vec<Option<Uuid>> = changes.iter().map(|c| c.previous_scan_id).collect();
        let groups: Vec<&str> = changes.iter().map(|c| c.target_group.as_str()).collect();
        let names: Vec<Option<&str>> = changes.iter().map(|c| c.hostname.as_deref()).collect();
        let before: Vec<Option<String>> = changes.iter().map(|c| json(&c.before)).collect();
        let after: Vec<Option<String>> = changes.iter().map(|c| json(&c.after)).collect();
        sqlx::query(
            "INSERT INTO inventory_changes (kind, ip, port, at, scan_id, previous_scan_id, target_group, hostname,
                                            service_before, service_after)
             SELECT u.kind, u.ip, u.port, u.at, u.scan, u.prev, u.grp, u.name, u.before::jsonb, u.after::jsonb
             FROM UNNEST($1::text[], $2::inet[], $3::int4[], $4::timestamptz[], $5::uuid[], $6::uuid[], $7::text[],
                         $8::text[], $9::text[], $10::text[])
                 AS u(kind, ip, port, at, scan, prev, grp, name, before, after)",
        )
        .bind(&kinds)
        .bind(&ips)
        .bind(&ports)
        .bind(&ats)
        .bind(&scans)
        .bind(&previous)
        .bind(&groups)
        .bind(&names)
        .bind(&before)
        .bind(&after)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Merges host summaries (one per address).
    pub async fn put_hosts(&mut self, hosts: &[HostDelta]) -> Result<(), StoreError> {
        if hosts.is_empty() {
            return Ok(());
        }
        let ips: Vec<IpAddr> = hosts.iter().map(|h| h.ip).collect();
        let names: Vec<Option<&str>> = hosts.iter().map(|h| h.hostnames.as_deref()).collect();
        let groups: Vec<&str> = hosts.iter().map(|h| h.target_group.as_str()).collect();
        let deltas: Vec<i32> = hosts.iter().map(|h| h.open_ports).collect();
        let seen: Vec<DateTime<Utc>> = hosts.iter().map(|h| h.seen_at).collect();
        // Names are stored lower-case: DNS names compare case-insensitively.
        sqlx::query(
            "INSERT INTO inventory_hosts AS h (ip, hostnames, target_groups, open_ports, first_seen_at, last_seen_at)
             SELECT u.ip,
                    coalesce(string_to_array(lower(u.names), ','), '{}'),
                    CASE WHEN u.grp = '' THEN '{}' ELSE ARRAY[u.grp] END,
                    u.delta, u.seen, u.seen
             FROM UNNEST($1::inet[], $2::text[], $3::text[], $4::int4[], $5::timestamptz[])
                 AS u(ip, names, grp, delta, seen)
             ORDER BY u.ip
             ON CONFLICT (ip) DO UPDATE SET
                hostnames = ARRAY(SELECT DISTINCT x FROM unnest(h.hostnames || excluded.hostnames) AS x ORDER BY x),
                target_groups = ARRAY(SELECT DISTINCT x FROM unnest(h.target_groups || excluded.target_groups) AS x
                                      ORDER BY x),
                open_ports = greatest(h.open_ports + excluded.open_ports, 0),
                first_seen_at = least(h.first_seen_at, excluded.first_seen_at),
                last_seen_at = greatest(h.last_seen_at, excluded.last_seen_at)",
        )
        .bind(&ips)
        .bind(&names)
        .bind(&groups)
        .bind(&deltas)
        .bind(&seen)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Moves each shard's cursor to `batches`.
    pub async fn advance(&mut self, shards: &[i64], batches: &[i32]) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO inventory_cursors (shard_id, batches)
             SELECT * FROM UNNEST($1::int8[], $2::int4[])
             ON CONFLICT (shard_id) DO UPDATE SET batches = greatest(inventory_cursors.batches, excluded.batches)",
        )
        .bind(shards)
        .bind(batches)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    /// Finished (or deleted) scans not yet inventoried whose every result
    /// batch is folded, oldest first.
    pub async fn finished_scans(&mut self, limit: i64) -> Result<Vec<Finished>, StoreError> {
        let rows = sqlx::query_as::<_, Finished>(
            "SELECT s.id, s.target_group, s.started_at, s.finished_at, s.close_range, s.close_ip, s.close_port
             FROM scans s
             WHERE NOT s.inventoried AND s.state IN ('completed', 'cancelled', 'failed')
               AND NOT EXISTS (
                    SELECT 1 FROM shards sh LEFT JOIN inventory_cursors c ON c.shard_id = sh.id
                    WHERE sh.scan_id = s.id AND sh.result_batches > coalesce(c.batches, 0))
             ORDER BY s.id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows)
    }

    /// Records how far closing `scan_id` has got.
    pub async fn close_progress(
        &mut self,
        scan_id: Uuid,
        range: i32,
        after: Option<(IpAddr, i32)>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE scans SET close_range = $2, close_ip = $3, close_port = $4 WHERE id = $1")
            .bind(scan_id)
            .bind(range)
            .bind(after.map(|a| a.0))
            .bind(after.map(|a| a.1))
            .execute(&mut *self.tx)
            .await?;
        Ok(())
    }

    /// The scan's shards by start position.
    pub async fn covered(&mut self, scan_id: Uuid) -> Result<Vec<Covered>, StoreError> {
        let rows = sqlx::query_as::<_, Covered>(
            "SELECT start_index, end_index, checkpoint FROM shards WHERE scan_id = $1 ORDER BY start_index",
        )
        .bind(scan_id)
        .fetch_all(&mut *self.tx)
        .await?;
        Ok(rows)
    }

    /// Marks the scan inventoried and writes its `scan.changes` events:
    /// the counts, and its changes in pages of `page` (one event with none
    /// when nothing changed). Webhooks follow from the events (a trigger).
    pub async fn finish_scan(&mut self, scan_id: Uuid, page: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE scans SET inventoried = true WHERE id = $1").bind(scan_id).execute(&mut *self.tx).await?;
        sqlx::query(
            "WITH c AS (
                SELECT id, kind, ip, port, protocol, at, previous_scan_id, hostname, service_before, service_after,
                       (row_number() OVER (ORDER BY id) - 1) / $2 AS page
                FROM inventory_changes WHERE scan_id = $1
             ), counts AS (
                SELECT jsonb_build_object(
                    'opened', count(*) FILTER (WHERE kind = 'opened'),
                    'closed', count(*) FILTER (WHERE kind = 'closed'),
                    'service_changed', count(*) FILTER (WHERE kind = 'service_changed')) AS counts,
                    greatest(max(page) + 1, 1) AS pages
                FROM c
             ), pages AS (
                SELECT page, jsonb_agg(jsonb_strip_nulls(jsonb_build_object(
                    'kind', kind, 'ip', host(ip), 'port', port, 'protocol', protocol, 'time', at,
                    'previous_scan_id', previous_scan_id, 'hostname', hostname,
                    'service_before', service_before -> 'name', 'service_after', service_after -> 'name'))
                    ORDER BY id) AS changes
                FROM c GROUP BY page
                UNION ALL SELECT 0, '[]'::jsonb WHERE NOT EXISTS (SELECT 1 FROM c)
             )
             INSERT INTO scan_events (scan_id, event, payload)
             SELECT $1, 'changes', jsonb_build_object('counts', counts.counts, 'page', pages.page + 1,
                                                     'pages', counts.pages, 'changes', pages.changes)
             FROM pages, counts ORDER BY pages.page",
        )
        .bind(scan_id)
        .bind(page)
        .execute(&mut *self.tx)
        .await?;
        Ok(())
    }

    pub async fn commit(self) -> Result<(), StoreError> {
        self.tx.commit().await?;
        Ok(())
    }
}
