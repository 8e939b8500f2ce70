//! Agents known to the fleet.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{AgentClass, AgentState, Page, Paged, Store, StoreError, scans::Labels};
use crate::notify::Notice;

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
    #[sqlx(try_from = "String")]
    pub state: AgentState,
    pub controller_id: Option<String>,
    pub current_rate: i32,
    pub active_shards: i32,
    pub connected_at: Option<DateTime<Utc>>,
    pub last_heartbeat_at: Option<DateTime<Utc>>,
}

impl Store {
    /// Marks a connected agent draining and tells every controller.
    /// Returns the agent, or `None` if unknown.
    pub async fn drain_agent(&self, id: Uuid) -> Result<Option<AgentRecord>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query_as::<_, AgentRecord>(
            "UPDATE agents SET state = CASE WHEN state = 'connected' THEN 'draining' ELSE state END
             WHERE id = $1
             RETURNING id, name, version, labels, raw_socket, ipv6, max_rate, max_shards, state,
                       controller_id, current_rate, active_shards, connected_at, last_heartbeat_at",
        )
        .bind(id)
        .fetch_optional(&mut *tx)
        .await?;
        if row.as_ref().is_some_and(|a| a.state == AgentState::Draining) {
            super::notify(&mut tx, Notice::AgentDrain(id)).await?;
        }
        tx.commit().await?;
        Ok(row)
    }

    pub async fn list_agents(
        &self,
        state: Option<AgentState>,
        page: Page<Uuid>,
    ) -> Result<Paged<AgentRecord, Uuid>, StoreError> {
        let rows = sqlx::query_as::<_, AgentRecord>(
            "SELECT id, name, version, labels, raw_socket, ipv6, max_rate, max_shards, state,
                    controller_id, current_rate, active_shards, connected_at, last_heartbeat_at
             FROM agents
             WHERE ($1::text IS NULL OR state = $1) AND id > $2
             ORDER BY id LIMIT $3",
        )
        .bind(state.map(AgentState::as_str))
        .bind(page.after.unwrap_or(Uuid::nil()))
        .bind(i64::from(page.limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        Ok(Paged::from_rows(rows, page.limit, |a| a.id))
    }
}

/// Where an agent's current session stands.
#[derive(Clone, Copy, Debug, sqlx::FromRow)]
pub struct AgentStanding {
    pub id: Uuid,
    pub generation: i64,
    pub draining: bool,
    pub revoked: bool,
}

#[derive(sqlx::FromRow)]
struct ClassRow {
    raw_socket: bool,
    ipv6: bool,
    labels: Json<Labels>,
}

/// An agent as it introduced itself in Hello.
#[derive(Clone, Debug)]
pub struct AgentIntro {
    pub id: Uuid,
    pub name: String,
    pub version: String,
    pub labels: Labels,
    pub raw_socket: bool,
    pub ipv6: bool,
    pub max_rate: i32,
    pub max_shards: i32,
}

/// One agent's heartbeat, as the batch writer records it.
#[derive(Clone, Debug)]
pub struct Beat {
    pub agent_id: Uuid,
    pub generation: i64,
    pub current_rate: i32,
    pub active_shards: i32,
}

impl Store {
    /// Records a new session of an agent and returns its generation, which
    /// only goes up: frames and heartbeats of older sessions are fenced.
    pub async fn open_agent_session(&self, a: &AgentIntro, controller_id: &str) -> Result<i64, StoreError> {
        let generation = sqlx::query_scalar::<_, i64>(
            "INSERT INTO agents (id, name, version, labels, raw_socket, ipv6, max_rate, max_shards, state,
                                 controller_id, session_generation, connected_at, last_heartbeat_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'connected', $9, 1, now(), now())
             ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, version = EXCLUDED.version,
                labels = EXCLUDED.labels, raw_socket = EXCLUDED.raw_socket, ipv6 = EXCLUDED.ipv6,
                max_rate = EXCLUDED.max_rate, max_shards = EXCLUDED.max_shards, state = 'connected',
                controller_id = EXCLUDED.controller_id, session_generation = agents.session_generation + 1,
                connected_at = now(), last_heartbeat_at = now(), current_rate = 0, active_shards = 0
             RETURNING session_generation",
        )
        .bind(a.id)
        .bind(&a.name)
        .bind(&a.version)
        .bind(Json(&a.labels))
        .bind(a.raw_socket)
        .bind(a.ipv6)
        .bind(a.max_rate)
        .bind(a.max_shards)
        .bind(controller_id)
        .fetch_one(&self.pool)
        .await?;
        Ok(generation)
    }

    /// Writes many heartbeats in one statement; an older session's beat
    /// changes nothing.
    #[tracing::instrument(name = "store.record_heartbeats", skip_all, fields(beats = beats.len()))]
    pub async fn record_heartbeats(&self, beats: &[Beat]) -> Result<(), StoreError> {
        if beats.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = beats.iter().map(|b| b.agent_id).collect();
        let gens: Vec<i64> = beats.iter().map(|b| b.generation).collect();
        let rates: Vec<i32> = beats.iter().map(|b| b.current_rate).collect();
        let active: Vec<i32> = beats.iter().map(|b| b.active_shards).collect();
        sqlx::query(
            "UPDATE agents a SET last_heartbeat_at = now(), current_rate = b.rate, active_shards = b.active
             FROM UNNEST($1::uuid[], $2::int8[], $3::int4[], $4::int4[]) AS b(id, generation, rate, active)
             WHERE a.id = b.id AND a.session_generation = b.generation",
        )
        .bind(&ids)
        .bind(&gens)
        .bind(&rates)
        .bind(&active)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub async fn set_agent_state(&self, agent_id: Uuid, generation: i64, state: AgentState) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agents SET state = $3, current_rate = CASE WHEN $3 = 'gone' THEN 0 ELSE current_rate END
             WHERE id = $1 AND session_generation = $2",
        )
        .bind(agent_id)
        .bind(generation)
        .bind(state.as_str())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Each agent's current session generation (to find sessions a newer
    /// one replaced), whether an operator asked it to drain, and whether it
    /// is revoked.
    pub async fn agent_standings(&self, ids: &[Uuid]) -> Result<Vec<AgentStanding>, StoreError> {
        let rows = sqlx::query_as::<_, AgentStanding>(
            "SELECT id, session_generation AS generation, state = 'draining' AS draining,
                    EXISTS (SELECT 1 FROM revoked_agents r WHERE r.agent_id = agents.id) AS revoked
             FROM agents WHERE id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Marks agents whose controller stopped heartbeating for them as gone.
    pub async fn expire_agents(&self, silent_for: Duration) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agents SET state = 'gone', current_rate = 0
             WHERE state <> 'gone' AND last_heartbeat_at < now() - $1 * interval '1 millisecond'",
        )
        .bind(silent_for.as_millis() as i64)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// What the connected fleet can run: each distinct class of connected
    /// agent, for explaining why a scan waits.
    pub async fn connected_agent_classes(&self) -> Result<Vec<AgentClass>, StoreError> {
        let rows = sqlx::query_as::<_, ClassRow>(
            "SELECT DISTINCT raw_socket, ipv6, labels FROM agents WHERE state <> 'gone' LIMIT 1000",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| AgentClass { raw_socket: r.raw_socket, ipv6: r.ipv6, labels: r.labels.0 })
            .collect())
    }
}
