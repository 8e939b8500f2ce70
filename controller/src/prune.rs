//! Data that does not grow for ever: marks scans past the retention
//! setting deleted, and removes deleted scans' rows in small batches
//! (each its own short transaction, so ingest never waits on it). Runs on
//! every controller; the work is idempotent, so two pruners at once only
//! share it.

use std::time::Duration;

use portfleet_core::backoff::Backoff;
use tokio_util::sync::CancellationToken;

use crate::store::{Store, StoreError};

/// Results removed per statement.
pub const DELETE_BATCH: i64 = 5000;
/// Scans marked expired per pass.
const EXPIRE_BATCH: i64 = 100;
/// Pause between batches, so a big delete leaves the database to ingest.
const BETWEEN_BATCHES: Duration = Duration::from_millis(10);
/// How often the retention is checked when there is nothing to delete.
const IDLE: Duration = Duration::from_secs(5);
/// Settled webhook deliveries are kept this long in the log.
const DELIVERY_LOG: Duration = Duration::from_secs(30 * 24 * 3600);

pub async fn run(store: Store, cancel: CancellationToken) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let wait = match pass(&store).await {
            Ok(true) => BETWEEN_BATCHES,
            Ok(false) => {
                backoff.reset();
                IDLE
            }
            Err(e) => {
                let retry_in = backoff.next_delay();
                tracing::warn!(error = %e, ?retry_in, "cannot prune deleted scans; retrying");
                retry_in
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// One batch of work; `true` when there is more.
pub async fn pass(store: &Store) -> Result<bool, StoreError> {
    let expired = store.expire_scans(EXPIRE_BATCH).await?;
    if expired > 0 {
        tracing::info!(scans = expired, "scans past the retention marked for deletion");
    }
    let Some(id) = store.deleted_scan().await? else {
        store.expire_deliveries(DELIVERY_LOG).await?;
        return Ok(expired > 0);
    };
    if store.purge_scan(id, DELETE_BATCH).await? {
        tracing::info!(scan_id = %id, "deleted scan removed");
    }
    Ok(true)
}
