//! Enrollment tokens and revoked agents (migrations/0004).

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{Store, StoreError, scans::Labels};

impl Store {
    pub async fn insert_enroll_token(
        &self,
        id: Uuid,
        secret_hash: &[u8],
        labels: &Labels,
        expires_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO enroll_tokens (id, secret_hash, labels, expires_at) VALUES ($1, $2, $3, $4)")
            .bind(id)
            .bind(secret_hash)
            .bind(Json(labels))
            .bind(expires_at)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Uses a token once, for `agent_id`: returns its labels, or `None` if
    /// the token is unknown, used, expired or the secret is wrong. One
    /// statement, so two agents racing with one token cannot both win.
    pub async fn redeem_enroll_token(
        &self,
        id: Uuid,
        secret_hash: &[u8],
        agent_id: Uuid,
    ) -> Result<Option<Labels>, StoreError> {
        let labels = sqlx::query_scalar::<_, Json<Labels>>(
            "UPDATE enroll_tokens SET used_at = now(), agent_id = $3
             WHERE id = $1 AND secret_hash = $2 AND used_at IS NULL AND expires_at > now()
             RETURNING labels",
        )
        .bind(id)
        .bind(secret_hash)
        .bind(agent_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(labels.map(|l| l.0))
    }

    pub async fn revoke_agent(&self, agent_id: Uuid) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO revoked_agents (agent_id) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(agent_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn is_agent_revoked(&self, agent_id: Uuid) -> Result<bool, StoreError> {
        let found: Option<i32> = sqlx::query_scalar("SELECT 1 FROM revoked_agents WHERE agent_id = $1")
            .bind(agent_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(found.is_some())
    }
}
