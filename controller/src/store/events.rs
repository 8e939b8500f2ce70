//! The outbox of lifecycle events (migrations/0003): written in the same
//! transaction as the change each announces, claimed by a publisher with
//! `FOR UPDATE SKIP LOCKED`, deleted once the broker confirmed them.

use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use super::{ScanEvent, ScanRecord, Store, StoreError};

#[derive(Debug, sqlx::FromRow)]
pub struct PendingEvent {
    pub event_id: i64,
    #[sqlx(try_from = "String")]
    pub event: ScanEvent,
    /// `scan.changes`: its page of changes.
    pub payload: Option<sqlx::types::Json<serde_json::Value>>,
    #[sqlx(flatten)]
    pub scan: ScanRecord,
}

/// Claimed events; their rows stay locked until `finish`.
pub struct PendingEvents {
    tx: Transaction<'static, Postgres>,
    pub events: Vec<PendingEvent>,
}

impl std::fmt::Debug for PendingEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingEvents").field("events", &self.events.len()).finish()
    }
}

pub(super) async fn record(
    tx: &mut Transaction<'_, Postgres>,
    scan_id: Uuid,
    event: ScanEvent,
) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO scan_events (scan_id, event) VALUES ($1, $2)")
        .bind(scan_id)
        .bind(event.as_str())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Counts `n` scans that ended with `event`, once their transaction has
/// committed (a rolled-back end is retried and would count twice).
pub(super) fn count_finished(event: ScanEvent, n: u64) {
    if event.is_final() && n > 0 {
        metrics::counter!("portfleet_scans_finished_total", "state" => event.as_str()).increment(n);
    }
}

impl Store {
    /// Claims up to `limit` events, oldest first, with their scans.
    pub async fn pending_events(&self, limit: i64) -> Result<PendingEvents, StoreError> {
        crate::metrics::timed("pending_events", async move {
        let mut tx = self.pool.begin().await?;
        let events = sqlx::query_as::<_, PendingEvent>(
            "SELECT e.id AS event_id, e.event, e.payload, s.id, s.request_id, s.state, s.targets, s.target_group, s.ports,
                    s.scan_type, s.rate, s.retries, s.labels, s.agent_selector, s.allow_connect_fallback, s.seed,
                    s.address_ranges, s.address_count, s.port_count, s.probes_planned, s.shard_count,
                    s.probes_done, s.open_ports, s.error, s.created_at, s.started_at, s.finished_at,
                    s.updated_at, s.has_ipv6, s.waiting_reason, s.origin, s.reply_to, s.correlation_id,
                    s.request_fingerprint, s.identify, s.port_threshold, s.priority, s.max_agents,
                    s.max_parallel_shards, s.exclude, s.exclude_ports, s.ip_version, s.scan_all_ips,
                    s.cdn_policy, s.limited_ranges, s.limited_ports, s.deadline, s.deadline_exceeded,
                    s.schedule_id
             FROM scan_events e JOIN scans s ON s.id = e.scan_id
             ORDER BY e.id
             LIMIT $1
             FOR UPDATE OF e SKIP LOCKED",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        Ok(PendingEvents { tx, events })
    }).await
    }

    /// Drops events nobody published within a day (no ingress running).
    pub async fn expire_events(&self) -> Result<u64, StoreError> {
        let n = sqlx::query("DELETE FROM scan_events WHERE created_at < now() - interval '1 day'")
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(n)
    }
}

impl PendingEvents {
    /// Deletes the published events and releases the rest.
    pub async fn finish(mut self, published: &[i64]) -> Result<(), StoreError> {
        if !published.is_empty() {
            sqlx::query("DELETE FROM scan_events WHERE id = ANY($1)").bind(published).execute(&mut *self.tx).await?;
        }
        self.tx.commit().await?;
        Ok(())
    }
}
