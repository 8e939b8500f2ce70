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

/// Keyset position in a scan's results.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultKey {
    pub ip: IpAddr,
    pub port: i32,
    pub protocol: String,
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
             ORDER BY shard_batch, ip, port",
        )
        .bind(shard_id)
        .bind(after)
        .bind(upto)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Ordered by (ip, port, protocol), the primary key's order.
    pub async fn list_results(
        &self,
        scan_id: Uuid,
        page: Page<ResultKey>,
    ) -> Result<Paged<ResultRecord, ResultKey>, StoreError> {
        let limit = i64::from(page.limit) + 1;
        let query = match &page.after {
            None => sqlx::query_as::<_, ResultRecord>(
                "SELECT ip, port, protocol, state, hostname, first_seen_at, last_seen_at
                 FROM results WHERE scan_id = $1
                 ORDER BY ip, port, protocol LIMIT $2",
            )
            .bind(scan_id)
            .bind(limit),
            Some(after) => sqlx::query_as::<_, ResultRecord>(
                "SELECT ip, port, protocol, state, hostname, first_seen_at, last_seen_at
                 FROM results WHERE scan_id = $1 AND (ip, port, protocol) > ($3, $4, $5)
                 ORDER BY ip, port, protocol LIMIT $2",
            )
            .bind(scan_id)
            .bind(limit)
            .bind(after.ip)
            .bind(after.port)
            .bind(&after.protocol),
        };
        let rows = query.fetch_all(&self.pool).await?;
        Ok(Paged::from_rows(rows, page.limit, |r| ResultKey { ip: r.ip, port: r.port, protocol: r.protocol.clone() }))
    }
}
