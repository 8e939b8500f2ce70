//! Scan results: open ports, idempotent on (scan, ip, port, protocol).

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use portfleet_core::Service;
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use super::{Page, Paged, PortState, Store, StoreError};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ResultRecord {
    pub ip: IpAddr,
    pub port: i32,
    pub protocol: String,
    #[sqlx(try_from = "String")]
    pub state: PortState,
    pub hostname: Option<String>,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
    /// What answered, when the scan identified services.
    pub service: Option<Json<Service>>,
    pub host_answers_everything: bool,
}

/// How many result batches a shard has committed (its `shard_batch`
/// counter): a WatchScan cursor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct ResultHead {
    pub shard_id: i64,
    pub batches: i32,
}

/// ListResults' filters, combined with AND.
#[derive(Clone, Debug, Default)]
pub struct ResultFilter {
    pub cidr: Option<ipnet::IpNet>,
    pub port: Option<i32>,
    pub hostname: Option<String>,
    pub state: Option<PortState>,
    pub observed_since: Option<DateTime<Utc>>,
}

/// A result with its position in the scan's index space (its keyset key).
#[derive(sqlx::FromRow)]
struct PositionedResult {
    position: i64,
    #[sqlx(flatten)]
    record: ResultRecord,
}

/// Keyset position in a scan's results: the probe's position in the
/// scan's index space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultKey {
    pub position: i64,
}

impl Store {
    /// The distinct `hostname` values of a scan's results (each the names
    /// of one address, joined by ','): the names with an open port.
    pub async fn result_hostnames(&self, scan_id: Uuid) -> Result<Vec<String>, StoreError> {
        let rows =
            sqlx::query_scalar("SELECT DISTINCT hostname FROM results WHERE scan_id = $1 AND hostname IS NOT NULL")
                .bind(scan_id)
                .fetch_all(&self.pool)
                .await?;
        Ok(rows)
    }

    /// How many result batches each shard of a scan has committed.
    pub async fn result_heads(&self, scan_id: Uuid) -> Result<Vec<ResultHead>, StoreError> {
        let rows = sqlx::query_as::<_, ResultHead>(
            "SELECT id AS shard_id, result_batches AS batches FROM shards WHERE scan_id = $1 AND result_batches > 0",
        )
        .bind(scan_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The results a shard's batches `(after, upto]` first wrote.
    #[tracing::instrument(name = "store.shard_results", skip_all, fields(shard_id, after, upto))]
    pub async fn shard_results(&self, shard_id: i64, after: i32, upto: i32) -> Result<Vec<ResultRecord>, StoreError> {
        let rows = sqlx::query_as::<_, ResultRecord>(
            "SELECT ip, port, protocol, state, hostname, first_seen_at, last_seen_at, service, host_answers_everything
             FROM results WHERE shard_id = $1 AND shard_batch > $2 AND shard_batch <= $3
             ORDER BY shard_batch, position",
        )
        .bind(shard_id)
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// In scan order (by position in the scan's index space).
    #[tracing::instrument(name = "store.list_results", skip_all, fields(%scan_id, limit = page.limit))]
    pub async fn list_results(
        &self,
        scan_id: Uuid,
        filter: &ResultFilter,
        page: Page<ResultKey>,
    ) -> Result<Paged<ResultRecord, ResultKey>, StoreError> {
        crate::metrics::timed("list_results", async move {
        let (lo, hi) = super::inventory::bounds(filter.cidr);
        // hostname holds an address's names joined by ','.
        let rows = sqlx::query_as::<_, PositionedResult>(
            "SELECT position, ip, port, protocol, state, hostname, first_seen_at, last_seen_at, service, host_answers_everything
             FROM results WHERE scan_id = $1 AND position > $2
               AND ($4::inet IS NULL OR ip BETWEEN $4 AND $5)
               AND ($6::int4 IS NULL OR port = $6)
               AND ($7::text IS NULL OR lower($7) = ANY (string_to_array(lower(hostname), ',')))
               AND ($8::text IS NULL OR state = $8)
               AND ($9::timestamptz IS NULL OR last_seen_at >= $9)
             ORDER BY position LIMIT $3",
        )
        .bind(scan_id)
        .bind(page.after.map_or(-1, |k| k.position))
        .bind(i64::from(page.limit) + 1)
        .bind(lo)
        .bind(hi)
        .bind(filter.port)
        .bind(filter.hostname.as_deref())
        .bind(filter.state.map(PortState::as_str))
        .bind(filter.observed_since)
        .fetch_all(&self.pool)
        .await?;
        let paged = Paged::from_rows(rows, page.limit, |r| ResultKey { position: r.position });
        Ok(Paged { items: paged.items.into_iter().map(|r| r.record).collect(), next: paged.next })
    }).await
    }
}
