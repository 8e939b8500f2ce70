//! Stored targets: what `target_group` scans expand to.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Page, Paged, Store, StoreError};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct TargetRecord {
    pub id: Uuid,
    pub value: String,
    pub kind: String,
    pub group_name: String,
    pub enabled: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Debug)]
pub struct NewTarget {
    pub value: String,
    pub kind: &'static str,
    pub group: String,
    pub enabled: bool,
}

#[derive(Clone, Debug, Default)]
pub struct TargetFilter {
    pub group: Option<String>,
    pub enabled_only: bool,
}

impl Store {
    /// Inserts or updates (by group and value) in one statement. Callers
    /// dedupe: one statement may not touch a row twice.
    pub async fn upsert_targets(&self, targets: &[NewTarget]) -> Result<Vec<TargetRecord>, StoreError> {
        let ids: Vec<Uuid> = targets.iter().map(|_| Uuid::now_v7()).collect();
        let values: Vec<&str> = targets.iter().map(|t| t.value.as_str()).collect();
        let kinds: Vec<&str> = targets.iter().map(|t| t.kind).collect();
        let groups: Vec<&str> = targets.iter().map(|t| t.group.as_str()).collect();
        let enabled: Vec<bool> = targets.iter().map(|t| t.enabled).collect();
        let rows = sqlx::query_as::<_, TargetRecord>(
            "INSERT INTO targets (id, value, kind, group_name, enabled)
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::bool[])
             ON CONFLICT ON CONSTRAINT targets_group_value_key
             DO UPDATE SET enabled = EXCLUDED.enabled
             RETURNING id, value, kind, group_name, enabled, created_at",
        )
        .bind(&ids)
        .bind(&values)
        .bind(&kinds)
        .bind(&groups)
        .bind(&enabled)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    pub async fn list_targets(
        &self,
        filter: &TargetFilter,
        page: Page<Uuid>,
    ) -> Result<Paged<TargetRecord, Uuid>, StoreError> {
        let rows = sqlx::query_as::<_, TargetRecord>(
            "SELECT id, value, kind, group_name, enabled, created_at FROM targets
             WHERE ($1::text IS NULL OR group_name = $1)
               AND (NOT $2 OR enabled)
               AND id > $3
             ORDER BY id
             LIMIT $4",
        )
        .bind(filter.group.as_deref())
        .bind(filter.enabled_only)
        .bind(page.after.unwrap_or(Uuid::nil()))
        .bind(i64::from(page.limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Paged::from_rows(rows, page.limit, |t| t.id))
    }

    /// Whether a target was deleted.
    pub async fn delete_target(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("DELETE FROM targets WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(done.rows_affected() > 0)
    }

    /// The values of a group's enabled targets (every group's for `*`), at
    /// most `limit` of them.
    pub async fn enabled_targets_of_group(&self, group: &str, limit: u32) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query_scalar::<_, String>(
            "SELECT DISTINCT ON (value) value FROM (
                SELECT value, id FROM targets WHERE ($1 = '*' OR group_name = $1) AND enabled ORDER BY id LIMIT $2
             ) t",
        )
        .bind(group)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}
