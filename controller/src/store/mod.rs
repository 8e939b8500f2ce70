//! All SQL lives here. The store owns the connection pool, applies the
//! migrations, and offers one batched statement per operation: nothing loops
//! over rows issuing a query each.

mod agents;
mod enroll;
mod error;
mod events;
mod gauges;
mod ids;
mod inventory;
mod leases;
mod naabum8;
mod policy;
mod results;
mod retention;
mod scans;
mod schedules;
mod states;
mod targets;
mod tokens;
mod webhooks;

use std::time::Duration;

use portfleet_core::backoff::Backoff;
use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tokio_util::sync::CancellationToken;

pub use agents::{AgentIntro, AgentRecord, AgentStanding, Beat, FleetGroup, LiveSession, SessionOpening};
pub use error::{StoreError, unavailable_hint};
pub use events::{PendingEvent, PendingEvents};
pub use gauges::FleetGauges;
pub use ids::{LeaseEpoch, OutOfRange, Seq, ShardId};
pub use inventory::{
    ChangeFilter, ChangeKey, ChangeRecord, Covered, Finished, HostDelta, HostFilter, HostKey, HostRecord, InventoryTx,
    Lagging, NewChange, Observed, PortRow,
};
pub use leases::{
    Adopted, AgentClass, Applied, FailOutcome, Fence, Grant, LeaseRecord, LeaseState, LeasedScan, PortRecord, Retry,
    ScanHost, ScanParams, ShardProgress,
};
pub use naabum8::{Export, NaabuM8Db};
pub use policy::{ActiveScanRanges, CapsUpdate, ScopeRules};
pub use results::{ResultFilter, ResultHead, ResultKey, ResultRecord};
pub use retention::Deleted;
pub use scans::{Labels, NewScan, NewShard, ScanRecord, Shaping};
pub use schedules::{Advance, LastRun, NewRun, OptionalState, RunRecord, ScheduleRecord};
pub use states::{
    AgentState, ChangeKind, DeliveryState, LeaseOutcome, Origin, Overlap, PortState, RunOutcome, ScanEvent, ScanState,
    ScopeAction, ShardState, UnknownValue,
};
pub use targets::{NewTarget, TargetFilter, TargetRecord};
pub use tokens::TokenRecord;
pub use webhooks::{Attempt, DeliveryKey, DeliveryRecord, DueDelivery, WebhookRecord};

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Clone, Debug)]
pub struct DatabaseConfig {
    pub options: PgConnectOptions,
    pub pool_size: u32,
    /// How long a query waits for a connection before the call fails with
    /// UNAVAILABLE: short, so a dead database is reported, not waited on.
    pub acquire_timeout: Duration,
}

/// A page request: at most `limit` rows after the keyset position `after`.
#[derive(Clone, Debug)]
pub struct Page<K> {
    pub after: Option<K>,
    pub limit: u32,
}

/// Rows of one page and the key to continue from, when there is more.
#[derive(Clone, Debug)]
pub struct Paged<T, K> {
    pub items: Vec<T>,
    pub next: Option<K>,
}

impl<T, K> Paged<T, K> {
    /// Builds a page from `limit + 1` fetched rows: the extra row only says
    /// that another page exists.
    fn from_rows(mut rows: Vec<T>, limit: u32, key: impl Fn(&T) -> K) -> Self {
        let more = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let next = if more { rows.last().map(key) } else { None };
        Self { items: rows, next }
    }
}

#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
}

impl Store {
    /// A lazy pool: no connection is made until the first query, so the
    /// controller starts (and recovers) whether or not the database is up.
    pub fn connect_lazy(config: &DatabaseConfig) -> Self {
        Self::connect_lazy_warm(config, 0)
    }

    /// [`Store::connect_lazy`], keeping at least `warm` connections open
    /// (made in the background, remade when they drop): a new connection
    /// costs a call ~90 ms (TLS with the server, sqlx's setup).
    pub fn connect_lazy_warm(config: &DatabaseConfig, warm: u32) -> Self {
        let pool = PgPoolOptions::new()
            .max_connections(config.pool_size)
            .min_connections(warm.min(config.pool_size))
            .acquire_timeout(config.acquire_timeout)
            .test_before_acquire(true)
            .connect_lazy_with(config.options.clone());
        Self { pool }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the migrations, waiting for the database with backoff while
    /// it is unreachable. Safe with several controllers starting at once:
    /// sqlx serialises them with an advisory lock.
    pub async fn migrate(&self, cancel: &CancellationToken) -> Result<(), StoreError> {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        loop {
            let retry_in = match MIGRATOR.run(&self.pool).await {
                Ok(()) => return Ok(()),
                Err(sqlx::migrate::MigrateError::Execute(e)) if error::is_transient(&e) => {
                    let retry_in = backoff.next_delay();
                    tracing::warn!(error = %e, ?retry_in, "database unreachable, waiting to migrate");
                    retry_in
                }
                Err(e) => return Err(StoreError::Migrate(e)),
            };
            tokio::select! {
                _ = cancel.cancelled() => return Err(StoreError::Cancelled),
                _ = tokio::time::sleep(retry_in) => {}
            }
        }
    }

    /// Opens `n` connections now (best effort): the first calls then do
    /// not wait for new ones.
    pub async fn warm_up(&self, n: u32) {
        let held = futures::future::join_all((0..n).map(|_| self.pool.acquire())).await;
        if let Some(Err(e)) = held.into_iter().find(Result::is_err) {
            tracing::debug!(error = %e, "cannot open database connections ahead of use");
        }
    }

    /// Whether the database answers now.
    pub async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Sends `notice` to every controller when `tx` commits.
async fn notify(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    notice: crate::notify::Notice,
) -> Result<(), StoreError> {
    let Some(payload) = notice.encode() else { return Ok(()) };
    sqlx::query("SELECT pg_notify($1, $2)").bind(crate::notify::CHANNEL).bind(payload).execute(&mut **tx).await?;
    Ok(())
}
