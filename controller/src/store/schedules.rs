//! Schedules and their runs. Firing is claim, create, record, advance:
//! a claim holds a due schedule for one controller (`claimed_until`), the
//! run's scan carries an idempotency key made of the schedule and its due
//! time, and `schedule_runs`' primary key keeps one row per due time, so a
//! due time fires once however many controllers try and whichever of them
//! crashes where.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use uuid::Uuid;

use super::{Overlap, Page, Paged, RunOutcome, ScanState, Store, StoreError};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ScheduleRecord {
    pub id: Uuid,
    pub name: String,
    pub cron: Option<String>,
    pub time_zone: String,
    pub interval_secs: Option<i64>,
    pub jitter_secs: i64,
    #[sqlx(try_from = "String")]
    pub overlap: Overlap,
    /// The domain's `ScanTemplate`, as JSON.
    pub template: Json<serde_json::Value>,
    pub max_run_secs: Option<i64>,
    pub paused: bool,
    pub next_run_at: Option<DateTime<Utc>>,
    pub fire_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `"<prefix> <every schedules column> <suffix>"`, at compile time (sqlx
/// takes only static SQL).
macro_rules! with_columns {
    ($prefix:literal, $suffix:literal) => {
        concat!(
            $prefix,
            " id, name, cron, time_zone, interval_secs, jitter_secs, overlap, template, max_run_secs, \
             paused, next_run_at, fire_at, created_at, updated_at ",
            $suffix
        )
    };
}

/// One run of a schedule, with its scan's state when it started one.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RunRecord {
    pub schedule_id: Uuid,
    pub due_at: DateTime<Utc>,
    pub fired_at: DateTime<Utc>,
    #[sqlx(try_from = "String")]
    pub outcome: RunOutcome,
    pub scan_id: Option<Uuid>,
    #[sqlx(try_from = "String")]
    pub scan_state: OptionalState,
    pub error: Option<String>,
}

/// A run's scan state; `None` for runs without a scan (or whose scan was
/// deleted).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OptionalState(pub Option<ScanState>);

impl TryFrom<String> for OptionalState {
    type Error = StoreError;

    fn try_from(s: String) -> Result<Self, StoreError> {
        if s.is_empty() {
            return Ok(Self(None));
        }
        ScanState::parse(&s).map(|s| Self(Some(s))).map_err(|e| StoreError::Corrupt(e.to_string()))
    }
}

/// A schedule's latest started run.
#[derive(Clone, Copy, Debug)]
pub struct LastRun {
    pub schedule_id: Uuid,
    pub due_at: DateTime<Utc>,
    pub scan_id: Uuid,
    pub state: Option<ScanState>,
}

/// A run to record: a due time's outcome.
#[derive(Clone, Debug)]
pub struct NewRun {
    pub schedule_id: Uuid,
    pub due_at: DateTime<Utc>,
    pub outcome: RunOutcome,
    pub scan_id: Option<Uuid>,
    pub error: Option<String>,
}

/// Where a fired schedule goes next.
#[derive(Clone, Copy, Debug)]
pub struct Advance {
    pub id: Uuid,
    /// The due time that fired: the advance applies only if the schedule
    /// still has it (an update meanwhile wins).
    pub due_at: DateTime<Utc>,
    pub next_run_at: DateTime<Utc>,
    pub fire_at: DateTime<Utc>,
}

impl Store {
    pub async fn insert_schedule(&self, s: &ScheduleRecord) -> Result<ScheduleRecord, StoreError> {
        let sql = with_columns!(
            "INSERT INTO schedules (id, name, cron, time_zone, interval_secs, jitter_secs, overlap, template,
                                    max_run_secs, paused, next_run_at, fire_at)
             SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 WHERE $13::timestamptz IS NOT NULL
             RETURNING",
            ""
        );
        self.write_schedule(sql, s).await?.ok_or_else(|| StoreError::Corrupt("no row for a stored schedule".into()))
    }

    /// Runs an INSERT or UPDATE whose $1..$12 are `s`'s fields in the
    /// order of `insert_schedule`'s columns, and $13 its `updated_at`.
    async fn write_schedule(
        &self,
        sql: &'static str,
        s: &ScheduleRecord,
    ) -> Result<Option<ScheduleRecord>, StoreError> {
        let row = sqlx::query_as::<_, ScheduleRecord>(sql)
            .bind(s.id)
            .bind(&s.name)
            .bind(&s.cron)
            .bind(&s.time_zone)
            .bind(s.interval_secs)
            .bind(s.jitter_secs)
            .bind(s.overlap.as_str())
            .bind(&s.template)
            .bind(s.max_run_secs)
            .bind(s.paused)
            .bind(s.next_run_at)
            .bind(s.fire_at)
            .bind(s.updated_at)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row)
    }

    pub async fn get_schedule(&self, id: Uuid) -> Result<Option<ScheduleRecord>, StoreError> {
        let sql = with_columns!("SELECT", "FROM schedules WHERE id = $1");
        Ok(sqlx::query_as::<_, ScheduleRecord>(sql).bind(id).fetch_optional(&self.pool).await?)
    }

    pub async fn list_schedules(&self, page: Page<Uuid>) -> Result<Paged<ScheduleRecord, Uuid>, StoreError> {
        let sql = with_columns!("SELECT", "FROM schedules WHERE id > $1 ORDER BY id LIMIT $2");
        let rows = sqlx::query_as::<_, ScheduleRecord>(sql)
            .bind(page.after.unwrap_or(Uuid::nil()))
            .bind(i64::from(page.limit) + 1)
            .fetch_all(&self.pool)
            .await?;
        Ok(Paged::from_rows(rows, page.limit, |s| s.id))
    }

    /// Writes every field of `s` but its id and creation time, if the row
    /// is still as `s` was read (its `updated_at`: a fire advancing it, or
    /// another update, moves that on); `None` otherwise or if it is gone.
    /// A claim in progress keeps going, but its advance finds a new due
    /// time and leaves it.
    pub async fn update_schedule(&self, s: &ScheduleRecord) -> Result<Option<ScheduleRecord>, StoreError> {
        let sql = with_columns!(
            "UPDATE schedules SET name = $2, cron = $3, time_zone = $4, interval_secs = $5, jitter_secs = $6,
                    overlap = $7, template = $8, max_run_secs = $9, paused = $10, next_run_at = $11,
                    fire_at = $12, updated_at = clock_timestamp()
             WHERE id = $1 AND updated_at = $13 RETURNING",
            ""
        );
        self.write_schedule(sql, s).await
    }

    /// `false` if it did not exist. Its runs go with it; their scans stay.
    pub async fn delete_schedule(&self, id: Uuid) -> Result<bool, StoreError> {
        let n = sqlx::query("DELETE FROM schedules WHERE id = $1").bind(id).execute(&self.pool).await?.rows_affected();
        Ok(n > 0)
    }

    /// Takes up to `limit` due schedules for `hold` under `token` (another
    /// controller takes over a claim that outlives it; then this one's
    /// token no longer advances or releases them).
    pub async fn claim_due_schedules(
        &self,
        limit: i64,
        hold: std::time::Duration,
        token: Uuid,
    ) -> Result<Vec<ScheduleRecord>, StoreError> {
        crate::metrics::timed("claim_due_schedules", async move {
            let sql = with_columns!(
                "UPDATE schedules SET claimed_until = now() + make_interval(secs => $2), claim_token = $3
                 WHERE id IN (SELECT id FROM schedules
                              WHERE NOT paused AND fire_at <= now()
                                AND (claimed_until IS NULL OR claimed_until < now())
                              ORDER BY fire_at LIMIT $1 FOR UPDATE SKIP LOCKED)
                 RETURNING",
                ""
            );
            let rows = sqlx::query_as::<_, ScheduleRecord>(sql)
                .bind(limit)
                .bind(hold.as_secs_f64())
                .bind(token)
                .fetch_all(&self.pool)
                .await?;
            Ok(rows)
        })
        .await
    }

    /// The earliest time an unpaused schedule can be claimed: its fire
    /// time, or the end of another controller's claim on it.
    pub async fn next_schedule_fire(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(sqlx::query_scalar(
            "SELECT min(greatest(fire_at, coalesce(claimed_until, fire_at))) FROM schedules WHERE NOT paused",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// The latest run that started a scan, per schedule: its due time and
    /// its scan's state (`None`: the scan was deleted).
    pub async fn last_started_runs(&self, ids: &[Uuid]) -> Result<Vec<LastRun>, StoreError> {
        let rows: Vec<(Uuid, DateTime<Utc>, Uuid, Option<String>)> = sqlx::query_as(
            "SELECT DISTINCT ON (r.schedule_id) r.schedule_id, r.due_at, r.scan_id, s.state
             FROM schedule_runs r LEFT JOIN scans s ON s.id = r.scan_id AND s.deleted_at IS NULL
             WHERE r.schedule_id = ANY($1) AND r.outcome = 'started'
             ORDER BY r.schedule_id, r.due_at DESC",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(schedule_id, due_at, scan_id, state)| {
                let state =
                    state.map(|s| ScanState::parse(&s)).transpose().map_err(|e| StoreError::Corrupt(e.to_string()))?;
                Ok(LastRun { schedule_id, due_at, scan_id, state })
            })
            .collect()
    }

    /// Records runs (a due time already recorded keeps its first row) and,
    /// for each newly recorded started run, a `schedule.fired` event; then
    /// moves each schedule to its next run and lets go of every claim in
    /// `release`. One transaction.
    pub async fn finish_fires(
        &self,
        runs: &[NewRun],
        advances: &[Advance],
        release: &[Uuid],
        token: Uuid,
    ) -> Result<(), StoreError> {
        crate::metrics::timed("finish_fires", async move {
            let mut tx = self.pool.begin().await?;
            if !runs.is_empty() {
                let ids: Vec<Uuid> = runs.iter().map(|r| r.schedule_id).collect();
                let dues: Vec<DateTime<Utc>> = runs.iter().map(|r| r.due_at).collect();
                let outcomes: Vec<&str> = runs.iter().map(|r| r.outcome.as_str()).collect();
                let scans: Vec<Option<Uuid>> = runs.iter().map(|r| r.scan_id).collect();
                let errors: Vec<Option<String>> = runs.iter().map(|r| r.error.clone()).collect();
                sqlx::query(
                    "WITH ins AS (
                        INSERT INTO schedule_runs (schedule_id, due_at, outcome, scan_id, error)
                        SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::uuid[], $5::text[])
                        ON CONFLICT DO NOTHING
                        RETURNING schedule_id, due_at, outcome, scan_id
                     )
                     INSERT INTO scan_events (scan_id, event, payload)
                     SELECT scan_id, 'schedule_fired',
                            jsonb_build_object('schedule_id', schedule_id, 'due_time', due_at)
                     FROM ins WHERE outcome = 'started' AND scan_id IS NOT NULL",
                )
                .bind(&ids)
                .bind(&dues)
                .bind(&outcomes)
                .bind(&scans)
                .bind(&errors)
                .execute(&mut *tx)
                .await?;
            }
            if !advances.is_empty() {
                let ids: Vec<Uuid> = advances.iter().map(|a| a.id).collect();
                let dues: Vec<DateTime<Utc>> = advances.iter().map(|a| a.due_at).collect();
                let nexts: Vec<DateTime<Utc>> = advances.iter().map(|a| a.next_run_at).collect();
                let fires: Vec<DateTime<Utc>> = advances.iter().map(|a| a.fire_at).collect();
                sqlx::query(
                    "UPDATE schedules s SET next_run_at = u.next, fire_at = u.fire, updated_at = clock_timestamp()
                     FROM UNNEST($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::timestamptz[])
                         AS u(id, due, next, fire)
                     WHERE s.id = u.id AND s.next_run_at = u.due AND NOT s.paused AND s.claim_token = $5",
                )
                .bind(&ids)
                .bind(&dues)
                .bind(&nexts)
                .bind(&fires)
                .bind(token)
                .execute(&mut *tx)
                .await?;
            }
            if !release.is_empty() {
                sqlx::query(
                    "UPDATE schedules SET claimed_until = NULL, claim_token = NULL
                     WHERE id = ANY($1) AND claim_token = $2",
                )
                .bind(release)
                .bind(token)
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok(())
        })
        .await
    }

    /// Puts off queued runs (schedule, due time): they fire at `at` if
    /// the previous run is over, unless the schedule moved on meanwhile.
    pub async fn postpone_schedules(
        &self,
        runs: &[(Uuid, DateTime<Utc>)],
        at: DateTime<Utc>,
        token: Uuid,
    ) -> Result<(), StoreError> {
        if runs.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = runs.iter().map(|r| r.0).collect();
        let dues: Vec<DateTime<Utc>> = runs.iter().map(|r| r.1).collect();
        sqlx::query(
            "UPDATE schedules s SET fire_at = $3
             FROM UNNEST($1::uuid[], $2::timestamptz[]) AS u(id, due)
             WHERE s.id = u.id AND s.next_run_at = u.due AND NOT s.paused AND s.claim_token = $4",
        )
        .bind(&ids)
        .bind(&dues)
        .bind(at)
        .bind(token)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// A schedule's last `limit` runs, newest first.
    pub async fn schedule_runs(&self, id: Uuid, limit: i64) -> Result<Vec<RunRecord>, StoreError> {
        let rows = sqlx::query_as::<_, RunRecord>(
            "SELECT r.schedule_id, r.due_at, r.fired_at, r.outcome, r.scan_id, coalesce(s.state, '') AS scan_state,
                    r.error
             FROM schedule_runs r LEFT JOIN scans s ON s.id = r.scan_id AND s.deleted_at IS NULL
             WHERE r.schedule_id = $1 ORDER BY r.due_at DESC LIMIT $2",
        )
        .bind(id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows)
    }
}
