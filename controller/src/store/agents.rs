//! Agents known to the fleet.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{Page, Paged, Store, StoreError, scans::Labels};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AgentRecord {
    pub id: Uuid,
    pub name: String,
    pub version: String,
    pub labels: Json<Labels>,
    pub raw_socket: bool,
    pub ipv6: bool,
    pub max_rate: i32,
    pub max_shards: i32,
    pub state: String,
    pub controller_id: Option<String>,
    pub current_rate: i32,
    pub active_shards: i32,
    pub connected_at: Option<DateTime<Utc>>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
}

impl Store {
    pub async fn list_agents(
        &self,
        state: Option<&str>,
        page: Page<Uuid>,
    ) -> Result<Paged<AgentRecord, Uuid>, StoreError> {
        let rows = sqlx::query_as::<_, AgentRecord>(
            "SELECT id, name, version, labels, raw_socket, ipv6, max_rate, max_shards, state,
                    controller_id, current_rate, active_shards, connected_at, last_heartbeat_at
             FROM agents
             WHERE ($1::text IS NULL OR state = $1) AND id > $2
             ORDER BY id LIMIT $3",
        )
        .bind(state)
        .bind(page.after.unwrap_or(Uuid::nil()))
        .bind(i64::from(page.limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Paged::from_rows(rows, page.limit, |a| a.id))
    }
}
