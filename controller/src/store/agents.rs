//! Agents known to the fleet.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{AgentState, Page, Paged, Store, StoreError, scans::Labels};
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

    /// Ends an agent's drain. No notification: the controller holding its
    /// session compares its drains with this column once a second (the
    /// same check that catches a missed drain). Returns the agent, or
    /// `None` if unknown.
    pub async fn undrain_agent(&self, id: Uuid) -> Result<Option<AgentRecord>, StoreError> {
        let row = sqlx::query_as::<_, AgentRecord>(
            "UPDATE agents SET state = CASE WHEN state = 'draining' THEN 'connected' ELSE state END
             WHERE id = $1
             RETURNING id, name, version, labels, raw_socket, ipv6, max_rate, max_shards, state,
                       controller_id, current_rate, active_shards, connected_at, last_heartbeat_at",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
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

/// Connected agents alike in what they can run and in whether they can
/// take work now: `agents` of them. For explaining why a scan waits.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct FleetGroup {
    pub raw_socket: bool,
    pub ipv6: bool,
    pub labels: Json<Labels>,
    /// Asked to drain (or shutting down): no new work.
    pub draining: bool,
    /// Holding as many leases as its `max_shards`, on any controller.
    pub busy: bool,
    pub agents: i64,
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

/// What became of a new session of an agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SessionOpening {
    /// Recorded, with this generation.
    Opened(i64),
    /// Refused: another session of the agent is alive (see
    /// [`Store::open_agent_session`]).
    Live(LiveSession),
}

/// The live session a newcomer with the same agent id was refused for.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct LiveSession {
    pub controller_id: Option<String>,
    pub peer: Option<String>,
    /// Since its latest heartbeat.
    pub silent_ms: i64,
}

#[derive(sqlx::FromRow)]
struct OpeningRow {
    generation: Option<i64>,
    controller_id: Option<String>,
    peer: Option<String>,
    silent_ms: Option<i64>,
}

impl Store {
    /// Records a new session of an agent (coming from `peer`) and returns
    /// its generation, which only goes up: frames and heartbeats of older
    /// sessions are fenced. Refused while another session of the agent is
    /// alive - not gone, with a heartbeat within `live_for` - so that two
    /// processes with one id do not knock each other off forever; a dead
    /// one (its agent crashed, its connection half-open) gives way.
    pub async fn open_agent_session(
        &self,
        a: &AgentIntro,
        controller_id: &str,
        peer: Option<&str>,
        live_for: Duration,
    ) -> Result<SessionOpening, StoreError> {
        crate::metrics::timed("open_agent_session", async move {
            // The outer SELECT sees the row as it was before the upsert: the
            // live session, when the upsert's condition kept it.
            let row = sqlx::query_as::<_, OpeningRow>(
                "WITH up AS (
                INSERT INTO agents (id, name, version, labels, raw_socket, ipv6, max_rate, max_shards, state,
                                    controller_id, session_generation, connected_at, last_heartbeat_at, session_peer)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'connected', $9, 1, now(), now(), $10)
                ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, version = EXCLUDED.version,
                    labels = EXCLUDED.labels, raw_socket = EXCLUDED.raw_socket, ipv6 = EXCLUDED.ipv6,
                    max_rate = EXCLUDED.max_rate, max_shards = EXCLUDED.max_shards, state = 'connected',
                    controller_id = EXCLUDED.controller_id, session_generation = agents.session_generation + 1,
                    connected_at = now(), last_heartbeat_at = now(), current_rate = 0, active_shards = 0,
                    session_peer = EXCLUDED.session_peer
                WHERE agents.state = 'gone' OR agents.last_heartbeat_at < now() - $11 * interval '1 millisecond'
                RETURNING session_generation
             )
             SELECT (SELECT session_generation FROM up) AS generation, a.controller_id, a.session_peer AS peer,
                    (extract(epoch FROM now() - a.last_heartbeat_at) * 1000)::bigint AS silent_ms
             FROM (SELECT 1) AS one LEFT JOIN agents a ON a.id = $1",
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
            .bind(peer)
            .bind(live_for.as_millis().min(i64::MAX as u128) as i64)
            .fetch_one(&self.pool)
            .await?;
            Ok(match row.generation {
                Some(generation) => SessionOpening::Opened(generation),
                None => SessionOpening::Live(LiveSession {
                    controller_id: row.controller_id,
                    peer: row.peer,
                    silent_ms: row.silent_ms.unwrap_or_default(),
                }),
            })
        })
        .await
    }

    /// Writes many heartbeats in one statement; an older session's beat
    /// changes nothing.
    #[tracing::instrument(name = "store.record_heartbeats", skip_all, fields(beats = beats.len()))]
    pub async fn record_heartbeats(&self, beats: &[Beat]) -> Result<(), StoreError> {
        crate::metrics::timed("record_heartbeats", async move {
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
        })
        .await
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

    /// The connected fleet in groups (see [`FleetGroup`]), with leases
    /// counted from the shards (every controller's), for explaining why
    /// pending scans wait.
    pub async fn fleet_groups(&self) -> Result<Vec<FleetGroup>, StoreError> {
        let rows = sqlx::query_as::<_, FleetGroup>(
            "SELECT raw_socket, ipv6, labels, draining, busy, count(*) AS agents
             FROM (
                SELECT a.raw_socket, a.ipv6, a.labels, a.state = 'draining' AS draining,
                       (SELECT count(*) FROM shards sh WHERE sh.agent_id = a.id AND sh.state = 'leased')
                           >= a.max_shards AS busy
                FROM agents a WHERE a.state <> 'gone'
             ) f
             GROUP BY raw_socket, ipv6, labels, draining, busy
             LIMIT 1000",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }

    /// Connected agents (not draining) that could run a scan with these
    /// needs: the first `limit` names, and how many there are.
    pub async fn capable_agents(
        &self,
        raw_socket: bool,
        ipv6: bool,
        selector: &Labels,
        limit: i64,
    ) -> Result<(Vec<String>, u32), StoreError> {
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "SELECT name, count(*) OVER () FROM agents
             WHERE state = 'connected' AND labels @> $1 AND (ipv6 OR NOT $2) AND (raw_socket OR NOT $3)
             ORDER BY name LIMIT $4",
        )
        .bind(Json(selector))
        .bind(ipv6)
        .bind(raw_socket)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let count = rows.first().map_or(0, |r| r.1) as u32;
        Ok((rows.into_iter().map(|r| r.0).collect(), count))
    }
}
