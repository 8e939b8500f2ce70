//! Scans, their shards and hostnames.

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{Page, Paged, Store, StoreError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ScanState {
    Pending,
    Running,
    Completed,
    Cancelled,
    Failed,
}

impl ScanState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Result<Self, StoreError> {
        Ok(match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "completed" => Self::Completed,
            "cancelled" => Self::Cancelled,
            "failed" => Self::Failed,
            other => return Err(StoreError::Corrupt(format!("unknown scan state {other:?}"))),
        })
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled | Self::Failed)
    }
}

pub type Labels = std::collections::BTreeMap<String, String>;

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ScanRecord {
    pub id: Uuid,
    pub request_id: Option<String>,
    pub state: String,
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
}

impl ScanRecord {
    pub fn state(&self) -> Result<ScanState, StoreError> {
        ScanState::parse(&self.state)
    }
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
            started_at, finished_at, updated_at, has_ipv6, waiting_reason ",
            $suffix
        )
    };
}

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
    pub shards: Vec<NewShard>,
    pub hostnames: Vec<(IpAddr, String)>,
}

#[derive(Clone, Copy, Debug)]
pub struct NewShard {
    pub start: i64,
    pub end: i64,
}

impl Store {
    pub async fn scan_by_request_id(&self, request_id: &str) -> Result<Option<ScanRecord>, StoreError> {
        let row = sqlx::query_as::<_, ScanRecord>(with_scan_columns!("SELECT", "FROM scans WHERE request_id = $1"))
            .bind(request_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    /// Stores a planned scan with its shards and hostnames in one
    /// transaction. When another scan already holds the request id, nothing
    /// is written and that scan is returned instead.
    pub async fn insert_scan(&self, scan: &NewScan) -> Result<ScanRecord, StoreError> {
        let mut tx = self.pool.begin().await?;
        let inserted = sqlx::query_as::<_, ScanRecord>(with_scan_columns!(
            "INSERT INTO scans (id, request_id, targets, target_group, ports, scan_type, rate, retries,
                labels, agent_selector, allow_connect_fallback, seed, address_ranges, address_count,
                port_count, probes_planned, shard_count, has_ipv6)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18)
             ON CONFLICT ON CONSTRAINT scans_request_id_key DO NOTHING
             RETURNING",
            ""
        ))
        .bind(scan.id)
        .bind(scan.request_id.as_deref())
        .bind(&scan.targets)
        .bind(&scan.target_group)
        .bind(&scan.ports)
        .bind(scan.scan_type)
        .bind(scan.rate)
        .bind(scan.retries)
        .bind(Json(&scan.labels))
        .bind(Json(&scan.agent_selector))
        .bind(scan.allow_connect_fallback)
        .bind(scan.seed)
        .bind(&scan.address_ranges)
        .bind(scan.address_count)
        .bind(scan.port_count)
        .bind(scan.probes_planned)
        .bind(scan.shards.len() as i32)
        .bind(scan.has_ipv6)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(record) = inserted else {
            // Lost a race on the idempotency key: the winner is committed.
            tx.rollback().await?;
            let request_id = scan.request_id.as_deref().unwrap_or_default();
            return self
                .scan_by_request_id(request_id)
                .await?
                .ok_or_else(|| StoreError::Corrupt(format!("scan with request id {request_id:?} vanished")));
        };
        let numbers: Vec<i32> = (0..scan.shards.len() as i32).collect();
        let starts: Vec<i64> = scan.shards.iter().map(|s| s.start).collect();
        let ends: Vec<i64> = scan.shards.iter().map(|s| s.end).collect();
        sqlx::query(
            "INSERT INTO shards (scan_id, shard_no, start_index, end_index, checkpoint)
             SELECT $1, n, s, e, s FROM UNNEST($2::int4[], $3::int8[], $4::int8[]) AS u(n, s, e)",
        )
        .bind(scan.id)
        .bind(&numbers)
        .bind(&starts)
        .bind(&ends)
        .execute(&mut *tx)
        .await?;
        if !scan.hostnames.is_empty() {
            let ips: Vec<IpAddr> = scan.hostnames.iter().map(|(ip, _)| *ip).collect();
            let names: Vec<&str> = scan.hostnames.iter().map(|(_, n)| n.as_str()).collect();
            sqlx::query(
                "INSERT INTO scan_hosts (scan_id, ip, hostname)
                 SELECT $1, ip, name FROM UNNEST($2::inet[], $3::text[]) AS u(ip, name)",
            )
            .bind(scan.id)
            .bind(&ips)
            .bind(&names)
            .execute(&mut *tx)
            .await?;
        }
        // Schedulers on every controller wake up for it.
        sqlx::query("SELECT pg_notify('portfleet', 'c:' || $1::text)").bind(scan.id).execute(&mut *tx).await?;
        tx.commit().await?;
        Ok(record)
    }

    pub async fn get_scan(&self, id: Uuid) -> Result<Option<ScanRecord>, StoreError> {
        let row = sqlx::query_as::<_, ScanRecord>(with_scan_columns!("SELECT", "FROM scans WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    /// Newest first.
    pub async fn list_scans(
        &self,
        state: Option<ScanState>,
        page: Page<Uuid>,
    ) -> Result<Paged<ScanRecord, Uuid>, StoreError> {
        let rows = sqlx::query_as::<_, ScanRecord>(with_scan_columns!(
            "SELECT",
            "FROM scans
             WHERE ($1::text IS NULL OR state = $1) AND id < $2
             ORDER BY id DESC
             LIMIT $3"
        ))
        .bind(state.map(ScanState::as_str))
        .bind(page.after.unwrap_or(Uuid::max()))
        .bind(i64::from(page.limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Paged::from_rows(rows, page.limit, |s| s.id))
    }

    /// Moves a pending or running scan and its unfinished shards to
    /// cancelled. Returns the updated scan, or `None` when the scan was not
    /// cancellable (unknown, or already over).
    pub async fn cancel_scan(&self, id: Uuid) -> Result<Option<ScanRecord>, StoreError> {
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
            sqlx::query(
                "UPDATE shards SET state = 'cancelled', updated_at = now()
                 WHERE scan_id = $1 AND state IN ('pending', 'leased')",
            )
            .bind(id)
            .execute(&mut *tx)
            .await?;
            // Controllers holding its leases tell their agents to stop.
            super::leases::notify_scan(&mut tx, id).await?;
        }
        tx.commit().await?;
        Ok(row)
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
