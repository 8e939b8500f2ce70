//! Webhooks and their deliveries (migrations/0008). Deliveries are the
//! webhooks' outbox: a trigger writes one per (event, webhook) in the
//! transaction that records the event; a deliverer leases due ones (so a
//! crashed controller's attempt is retried by whoever comes next) and
//! records each outcome.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use uuid::Uuid;

use super::{DeliveryState, Page, Paged, Store, StoreError};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct WebhookRecord {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub secret: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeliveryRecord {
    pub id: i64,
    pub webhook_id: Uuid,
    pub event: String,
    pub scan_id: Uuid,
    #[sqlx(try_from = "String")]
    pub state: DeliveryState,
    pub attempts: i32,
    pub last_status: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_attempt_at: Option<DateTime<Utc>>,
    pub next_attempt_at: DateTime<Utc>,
}

/// A delivery leased for one attempt.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DueDelivery {
    pub id: i64,
    pub url: String,
    pub secret: String,
    pub event: String,
    pub scan_id: Uuid,
    pub payload: Option<Json<serde_json::Value>>,
    /// Including this one.
    pub attempts: i32,
}

/// How an attempt went.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub id: i64,
    pub state: DeliveryState,
    pub status: u16,
    pub error: Option<String>,
    /// When to try again (pending only).
    pub retry_in: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryKey {
    pub id: i64,
}

impl Store {
    pub async fn create_webhook(
        &self,
        url: &str,
        events: &[String],
        secret: &str,
    ) -> Result<WebhookRecord, StoreError> {
        let row = sqlx::query_as::<_, WebhookRecord>(
            "INSERT INTO webhooks (id, url, events, secret) VALUES ($1, $2, $3, $4)
             RETURNING id, url, events, secret, created_at",
        )
        .bind(Uuid::now_v7())
        .bind(url)
        .bind(events)
        .bind(secret)
        .fetch_one(&self.pool)
        .await?;
        Ok(row)
    }

    /// Oldest first.
    pub async fn list_webhooks(&self, page: Page<Uuid>) -> Result<Paged<WebhookRecord, Uuid>, StoreError> {
        let rows = sqlx::query_as::<_, WebhookRecord>(
            "SELECT id, url, events, secret, created_at FROM webhooks WHERE id > $1 ORDER BY id LIMIT $2",
        )
        .bind(page.after.unwrap_or(Uuid::nil()))
        .bind(i64::from(page.limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Paged::from_rows(rows, page.limit, |w| w.id))
    }

    /// Deletes a webhook and its delivery log; `false` if unknown.
    pub async fn delete_webhook(&self, id: Uuid) -> Result<bool, StoreError> {
        let n = sqlx::query("DELETE FROM webhooks WHERE id = $1").bind(id).execute(&self.pool).await?.rows_affected();
        Ok(n > 0)
    }

    pub async fn webhook_exists(&self, id: Uuid) -> Result<bool, StoreError> {
        let found: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM webhooks WHERE id = $1").bind(id).fetch_optional(&self.pool).await?;
        Ok(found.is_some())
    }

    /// Newest first.
    pub async fn list_deliveries(
        &self,
        webhook_id: Uuid,
        page: Page<DeliveryKey>,
    ) -> Result<Paged<DeliveryRecord, DeliveryKey>, StoreError> {
        let rows = sqlx::query_as::<_, DeliveryRecord>(
            "SELECT id, webhook_id, event, scan_id, state, attempts, last_status, last_error, created_at,
                    last_attempt_at, next_attempt_at
             FROM webhook_deliveries WHERE webhook_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
        )
        .bind(webhook_id)
        .bind(page.after.map_or(i64::MAX, |k| k.id))
        .bind(i64::from(page.limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Paged::from_rows(rows, page.limit, |d| DeliveryKey { id: d.id }))
    }

    /// Leases up to `limit` due deliveries for `lease`: another controller
    /// retries one only after that, if this one never records it.
    pub async fn lease_deliveries(&self, limit: i64, lease: Duration) -> Result<Vec<DueDelivery>, StoreError> {
        let rows = sqlx::query_as::<_, DueDelivery>(
            "UPDATE webhook_deliveries d
             SET next_attempt_at = now() + make_interval(secs => $2), attempts = d.attempts + 1,
                 last_attempt_at = now()
             FROM webhooks w
             WHERE w.id = d.webhook_id AND d.id IN (
                SELECT id FROM webhook_deliveries
                WHERE state = 'pending' AND next_attempt_at <= now()
                ORDER BY next_attempt_at LIMIT $1
                FOR UPDATE SKIP LOCKED)
             RETURNING d.id, w.url, w.secret, d.event, d.scan_id, d.payload, d.attempts",
        )
        .bind(limit)
        .bind(lease.as_secs_f64())
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// When the next delivery is due, if any is pending.
    pub async fn next_delivery_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        let at = sqlx::query_scalar("SELECT min(next_attempt_at) FROM webhook_deliveries WHERE state = 'pending'")
            .fetch_one(&self.pool)
            .await?;
        Ok(at)
    }

    pub async fn record_attempts(&self, attempts: &[Attempt]) -> Result<(), StoreError> {
        if attempts.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = attempts.iter().map(|a| a.id).collect();
        let states: Vec<&str> = attempts.iter().map(|a| a.state.as_str()).collect();
        let statuses: Vec<i32> = attempts.iter().map(|a| i32::from(a.status)).collect();
        let errors: Vec<Option<&str>> = attempts.iter().map(|a| a.error.as_deref()).collect();
        let retry: Vec<f64> = attempts.iter().map(|a| a.retry_in.as_secs_f64()).collect();
        sqlx::query(
            "UPDATE webhook_deliveries d
             SET state = u.state, last_status = u.status, last_error = u.error,
                 next_attempt_at = now() + make_interval(secs => u.retry)
             FROM UNNEST($1::int8[], $2::text[], $3::int4[], $4::text[], $5::float8[])
                 AS u(id, state, status, error, retry)
             WHERE d.id = u.id",
        )
        .bind(&ids)
        .bind(&states)
        .bind(&statuses)
        .bind(&errors)
        .bind(&retry)
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
