//! API tokens: only hashes are stored (migrations/0004).

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::{Page, Paged, Store, StoreError};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct TokenRecord {
    pub id: Uuid,
    pub name: String,
    pub scope: String,
    pub secret_hash: Vec<u8>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

const COLUMNS: &str = "id, name, scope, secret_hash, created_at, expires_at, revoked_at, last_used_at";

impl Store {
    pub async fn insert_token(
        &self,
        id: Uuid,
        name: &str,
        scope: &str,
        secret_hash: &[u8],
        expires_at: Option<DateTime<Utc>>,
    ) -> Result<TokenRecord, StoreError> {
        let row = sqlx::query_as::<_, TokenRecord>(sqlx::AssertSqlSafe(format!(
            "INSERT INTO api_tokens (id, name, scope, secret_hash, expires_at) VALUES ($1, $2, $3, $4, $5)
             RETURNING {COLUMNS}"
        )))
        .bind(id)
        .bind(name)
        .bind(scope)
        .bind(secret_hash)
        .bind(expires_at)
        .fetch_one(&self.pool)
        .await?;
        Ok(row)
    }

    pub async fn get_token(&self, id: Uuid) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query_as::<_, TokenRecord>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM api_tokens WHERE id = $1"
        )))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row)
    }

    pub async fn list_tokens(&self, page: Page<Uuid>) -> Result<Paged<TokenRecord, Uuid>, StoreError> {
        let rows = sqlx::query_as::<_, TokenRecord>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM api_tokens WHERE id > $1 ORDER BY id LIMIT $2"
        )))
        .bind(page.after.unwrap_or(Uuid::nil()))
        .bind(i64::from(page.limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Paged::from_rows(rows, page.limit, |t| t.id))
    }

    /// Revokes a token; `false` if there is no such token.
    pub async fn revoke_token(&self, id: Uuid) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE api_tokens SET revoked_at = coalesce(revoked_at, now()) WHERE id = $1")
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}
