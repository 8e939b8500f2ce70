//! Fleet-wide counts for the metrics sampler: one statement, every family.

use super::{AgentState, ScanState, ShardState, Store, StoreError};

/// Counts by state. Scans and shards are those of unfinished scans:
/// finished scans grow without bound and are counted as they finish
/// (`portfleet_scans_finished_total`).
#[derive(Debug, Default)]
pub struct FleetGauges {
    pub agents: Vec<(&'static str, i64)>,
    pub scans: Vec<(&'static str, i64)>,
    pub shards: Vec<(&'static str, i64)>,
    /// Events in the outbox, not yet published.
    pub outbox: i64,
}

impl Store {
    pub async fn fleet_gauges(&self) -> Result<FleetGauges, StoreError> {
        let rows = sqlx::query_as::<_, (String, String, i64)>(
            "SELECT 'agents', state, count(*) FROM agents GROUP BY state
             UNION ALL
             SELECT 'scans', state, count(*) FROM scans
             WHERE state IN ('pending', 'running') AND deleted_at IS NULL GROUP BY state
             UNION ALL
             SELECT 'shards', sh.state, count(*) FROM scans s JOIN shards sh ON sh.scan_id = s.id
             WHERE s.state IN ('pending', 'running') AND s.deleted_at IS NULL GROUP BY sh.state
             UNION ALL
             SELECT 'outbox', '', count(*) FROM scan_events",
        )
        .fetch_all(&self.pool)
        .await?;
        // Every state of the closed sets, zero when absent: a gauge that is
        // not set again would keep its last value.
        let mut g = FleetGauges {
            agents: AgentState::ALL.iter().map(|s| (s.as_str(), 0)).collect(),
            scans: [ScanState::Pending, ScanState::Running].iter().map(|s| (s.as_str(), 0)).collect(),
            shards: ShardState::ALL.iter().map(|s| (s.as_str(), 0)).collect(),
            outbox: 0,
        };
        for (family, state, n) in rows {
            let slot = match family.as_str() {
                "agents" => &mut g.agents,
                "scans" => &mut g.scans,
                "shards" => &mut g.shards,
                _ => {
                    g.outbox = n;
                    continue;
                }
            };
            if let Some(entry) = slot.iter_mut().find(|(s, _)| *s == state) {
                entry.1 = n;
            }
        }
        Ok(g)
    }
}
