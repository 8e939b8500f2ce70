//! Scan results: open ports, idempotent on (scan, ip, port, protocol).

use std::net::IpAddr;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{Page, Paged, Store, StoreError};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ResultRecord {
    pub ip: IpAddr,
    pub port: i32,
    pub protocol: String,
    pub state: String,
    pub hostname: Option<String>,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}

/// Keyset position in a scan's results: the probe's position in the
/// scan's index space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultKey {
    pub position: i64,
}

impl Store {
    /// How many result batches each shard of a scan has committed.
    pub async fn result_heads(&self, scan_id: Uuid) -> Result<Vec<(i64, i32)>, StoreError> {
        let rows = sqlx::query_as::<_, (i64, i32)>(
            "SELECT id, result_batches FROM shards WHERE scan_id = $1 AND result_batches > 0",
        )
        .bind(scan_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// The results a shard's batches `(after, upto]` first wrote.
    pub async fn shard_results(&self, shard_id: i64, after: i32, upto: i32) -> Result<Vec<ResultRecord>, StoreError> {
        let rows = sqlx::query_as::<_, ResultRecord>(
            "SELECT ip, port, protocol, state, hostname, first_seen_at, last_seen_at
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
    pub async fn list_results(
        &self,
        scan_id: Uuid,
        page: Page<ResultKey>,
    ) -> Result<Paged<ResultRecord, ResultKey>, StoreError> {
        let rows =
            sqlx::query_as::<_, (i64, IpAddr, i32, String, String, Option<String>, DateTime<Utc>, DateTime<Utc>)>(
                "SELECT position, ip, port, protocol, state, hostname, first_seen_at, last_seen_at
             FROM results WHERE scan_id = $1 AND position > $2
             ORDER BY position LIMIT $3",
            )
            .bind(scan_id)
            .bind(page.after.map_or(-1, |k| k.position))
            .bind(i64::from(page.limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        let rows: Vec<(i64, ResultRecord)> = rows
            .into_iter()
            .map(|(position, ip, port, protocol, state, hostname, first_seen_at, last_seen_at)| {
                (position, ResultRecord { ip, port, protocol, state, hostname, first_seen_at, last_seen_at })
            })
            .collect();
        let paged = Paged::from_rows(rows, page.limit, |(position, _)| ResultKey { position: *position });
        Ok(Paged { items: paged.items.into_iter().map(|(_, r)| r).collect(), next: paged.next })
    }
}
