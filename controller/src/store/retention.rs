//! Deleting scans, by request or by the retention setting: a deleted scan
//! leaves the API at once (`deleted_at`), and its rows go in small
//! batches, each its own short transaction, so neither ingest nor readers
//! wait on a long delete. The inventory keeps what the scan taught it.

use std::time::Duration;

use uuid::Uuid;

use super::{ScanState, Store, StoreError};

/// What DeleteScan found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deleted {
    Deleted,
    NotFound,
    /// Still pending or running.
    Active(ScanState),
}

impl Store {
    /// Marks a finished scan deleted and frees its request id.
    pub async fn delete_scan(&self, id: Uuid) -> Result<Deleted, StoreError> {
        let row: Option<(String, bool)> = sqlx::query_as(
            "WITH d AS (
                UPDATE scans SET deleted_at = now(), request_id = NULL
                WHERE id = $1 AND deleted_at IS NULL AND state IN ('completed', 'cancelled', 'failed')
                RETURNING state
             )
             SELECT state, true FROM d
             UNION ALL SELECT state, false FROM scans WHERE id = $1 AND deleted_at IS NULL
             LIMIT 1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(match row {
            None => Deleted::NotFound,
            Some((_, true)) => Deleted::Deleted,
            Some((state, false)) => {
                Deleted::Active(ScanState::parse(&state).map_err(|e| StoreError::Corrupt(e.to_string()))?)
            }
        })
    }

    /// How long finished scans are kept; `None`: for ever.
    pub async fn retention(&self) -> Result<Option<Duration>, StoreError> {
        let secs: Option<f64> = sqlx::query_scalar("SELECT extract(epoch FROM retain_scans)::float8 FROM retention")
            .fetch_one(&self.pool)
            .await?;
        Ok(secs.filter(|s| *s > 0.0).map(Duration::from_secs_f64))
    }

    pub async fn set_retention(&self, keep: Option<Duration>) -> Result<(), StoreError> {
        let secs = keep.filter(|d| !d.is_zero()).map(|d| d.as_secs_f64());
        sqlx::query("UPDATE retention SET retain_scans = make_interval(secs => $1), updated_at = now()")
            .bind(secs)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Marks up to `limit` finished scans past the retention deleted.
    pub async fn expire_scans(&self, limit: i64) -> Result<u64, StoreError> {
        let n = sqlx::query(
            "UPDATE scans SET deleted_at = now(), request_id = NULL
             WHERE id IN (
                SELECT s.id FROM scans s, retention r
                WHERE r.retain_scans IS NOT NULL AND s.deleted_at IS NULL AND s.finished_at IS NOT NULL
                  AND s.finished_at < now() - r.retain_scans AND s.state IN ('completed', 'cancelled', 'failed')
                ORDER BY s.finished_at LIMIT $1)",
        )
        .bind(limit)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n)
    }

    /// A deleted scan with rows still to remove: once the inventory has its
    /// closures (they read its results and shards), or a day after the
    /// deletion (no controller runs the inventory). The scan row itself
    /// waits while its events are unpublished (the publisher reads it), so
    /// such a scan is picked only while it has results left.
    pub async fn deleted_scan(&self) -> Result<Option<Uuid>, StoreError> {
        let id = sqlx::query_scalar(
            "SELECT s.id FROM scans s
             WHERE s.deleted_at IS NOT NULL
               AND (s.inventoried OR s.deleted_at < now() - interval '1 day')
               AND (EXISTS (SELECT 1 FROM results r WHERE r.scan_id = s.id)
                    OR NOT EXISTS (SELECT 1 FROM scan_events e WHERE e.scan_id = s.id))
             ORDER BY s.deleted_at LIMIT 1",
        )
        .fetch_optional(&self.pool)
        .await?;
        Ok(id)
    }

    /// Removes up to `batch` of a deleted scan's results; when none are
    /// left, its shards, hostnames, events and the scan row. `true` when
    /// the scan is gone.
    pub async fn purge_scan(&self, id: Uuid, batch: i64) -> Result<bool, StoreError> {
        let n = sqlx::query(
            "DELETE FROM results WHERE scan_id = $1 AND position IN (
                SELECT position FROM results WHERE scan_id = $1 ORDER BY position LIMIT $2)",
        )
        .bind(id)
        .bind(batch)
        .execute(&self.pool)
        .await?
        .rows_affected();
        if n > 0 {
            return Ok(false);
        }
        // Shards, hostnames, shard_leases and inventory_cursors go with the
        // scan (cascade); not while an event of it waits to be published
        // (or to expire, after a day, when no controller publishes).
        let gone = sqlx::query(
            "DELETE FROM scans s WHERE s.id = $1 AND s.deleted_at IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM scan_events e WHERE e.scan_id = s.id)",
        )
        .bind(id)
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(gone > 0)
    }

    /// Drops delivery log entries older than `age` that are settled.
    pub async fn expire_deliveries(&self, age: Duration) -> Result<u64, StoreError> {
        let n = sqlx::query(
            "DELETE FROM webhook_deliveries WHERE state <> 'pending'
               AND created_at < now() - make_interval(secs => $1)",
        )
        .bind(age.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected();
        Ok(n)
    }
}
