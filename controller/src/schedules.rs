//! Recurring scans: schedules (a cron expression in a time zone, or an
//! interval), the scan template each run creates, and the runner that
//! fires due schedules on every controller (docs/schedules.md).
//!
//! A due time fires once: the store's claim holds a schedule for one
//! controller, the run's scan has the idempotency key
//! `schedule:<id>:<due unix time>`, and the run row's primary key is the
//! due time. After downtime the oldest missed due time fires once and the
//! schedule moves to its next due time after now: missed slots are not
//! made up one by one.

use std::{collections::BTreeMap, collections::HashMap, str::FromStr, time::Duration};

use chrono::{DateTime, Utc};
use portfleet_core::{CdnPolicy, ScanType};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    scans::{IpVersion, Origin, ScanError, ScanManager, ScanRequestInput},
    store::{Advance, LastRun, NewRun, Overlap, Page, Paged, RunOutcome, RunRecord, ScheduleRecord, Store, StoreError},
};

/// The longest jitter.
pub const MAX_JITTER: Duration = Duration::from_secs(24 * 3600);
/// How long a controller holds a claimed schedule while it fires it: a
/// batch resolves its names (at most `ScanLimits::resolve_deadline`, 30 s,
/// 32 at a time) and cancels previous runs. A controller that dies holding
/// a claim delays those schedules this long at most.
const CLAIM_HOLD: Duration = Duration::from_secs(300);
/// A queued run looks again this often for the end of the previous one.
const QUEUE_RECHECK: Duration = Duration::from_secs(2);
/// Schedules fired per pass; a fuller pass goes again at once.
const FIRE_BATCH: i64 = 200;
/// Runs `GetSchedule` shows.
pub const SHOWN_RUNS: i64 = 20;
/// The label each run carries.
pub const SCHEDULE_LABEL: &str = "portfleet.schedule";

/// The scan a schedule's runs create: a request without what belongs to
/// one run (its idempotency key, deadline, reply routing).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScanTemplate {
    pub targets: Vec<String>,
    pub target_group: String,
    pub ports: String,
    pub scan_type: Option<String>,
    pub rate: u32,
    pub retries: Option<u32>,
    pub labels: BTreeMap<String, String>,
    pub agent_selector: BTreeMap<String, String>,
    pub allow_connect_fallback: bool,
    pub identify: Option<bool>,
    pub port_threshold: Option<u32>,
    pub priority: Option<u32>,
    pub max_agents: u32,
    pub max_parallel_shards: u32,
    pub exclude: Vec<String>,
    pub exclude_ports: String,
    pub ip_version: Option<IpVersion>,
    pub scan_all_ips: Option<bool>,
    pub cdn_policy: Option<String>,
}

impl ScanTemplate {
    pub fn from_input(i: &ScanRequestInput) -> Self {
        Self {
            targets: i.targets.clone(),
            target_group: i.target_group.clone(),
            ports: i.ports.clone(),
            scan_type: i.scan_type.map(|t| t.as_str().to_string()),
            rate: i.rate,
            retries: i.retries,
            labels: i.labels.clone(),
            agent_selector: i.agent_selector.clone(),
            allow_connect_fallback: i.allow_connect_fallback,
            identify: i.identify,
            port_threshold: i.port_threshold,
            priority: i.priority,
            max_agents: i.max_agents,
            max_parallel_shards: i.max_parallel_shards,
            exclude: i.exclude.clone(),
            exclude_ports: i.exclude_ports.clone(),
            ip_version: i.ip_version,
            scan_all_ips: i.scan_all_ips,
            cdn_policy: i.cdn_policy.map(|p| p.as_str().to_string()),
        }
    }

    pub fn to_input(&self) -> Result<ScanRequestInput, String> {
        let scan_type = match &self.scan_type {
            None => None,
            Some(t) => Some(ScanType::parse(t).ok_or_else(|| format!("scan_type {t:?}"))?),
        };
        let cdn_policy = self.cdn_policy.as_deref().map(CdnPolicy::parse).transpose()?;
        Ok(ScanRequestInput {
            targets: self.targets.clone(),
            target_group: self.target_group.clone(),
            ports: self.ports.clone(),
            scan_type,
            rate: self.rate,
            retries: self.retries,
            labels: self.labels.clone(),
            agent_selector: self.agent_selector.clone(),
            allow_connect_fallback: self.allow_connect_fallback,
            identify: self.identify,
            port_threshold: self.port_threshold,
            priority: self.priority,
            max_agents: self.max_agents,
            max_parallel_shards: self.max_parallel_shards,
            exclude: self.exclude.clone(),
            exclude_ports: self.exclude_ports.clone(),
            ip_version: self.ip_version,
            scan_all_ips: self.scan_all_ips,
            cdn_policy,
            ..Default::default()
        })
    }
}

/// When a schedule is due.
#[derive(Clone, Debug)]
pub enum Cadence {
    Cron { cron: Box<croner::Cron>, tz: chrono_tz::Tz },
    Every(Duration),
}

impl Cadence {
    /// Parses a five-field cron expression in an IANA time zone (empty:
    /// UTC), or takes an interval of at least `min_interval`.
    pub fn new(
        cron: Option<&str>,
        time_zone: &str,
        interval: Option<Duration>,
        min_interval: Duration,
    ) -> Result<Self, ScanError> {
        let tz = match time_zone.trim() {
            "" => chrono_tz::UTC,
            name => chrono_tz::Tz::from_str(name)
                .map_err(|_| invalid("time_zone", format!("{name:?} is not an IANA time zone (e.g. Europe/Paris)")))?,
        };
        match (cron.map(str::trim).filter(|c| !c.is_empty()), interval.filter(|d| !d.is_zero())) {
            (Some(_), Some(_)) => Err(invalid("interval", "give a cron expression or an interval, not both")),
            (None, None) => Err(invalid("cron", "give a cron expression or an interval")),
            (Some(expr), None) => {
                if expr.split_whitespace().count() != 5 {
                    return Err(invalid(
                        "cron",
                        format!("{expr:?}: five fields (minute hour day-of-month month day-of-week)"),
                    ));
                }
                let cron = croner::parser::CronParser::builder()
                    .seconds(croner::parser::Seconds::Disallowed)
                    .build()
                    .parse(expr)
                    .map_err(|e| invalid("cron", format!("{expr:?}: {e}")))?;
                // A pattern that never matches (31 February) would never fire.
                cron.find_next_occurrence(&Utc::now().with_timezone(&tz), false)
                    .map_err(|e| invalid("cron", format!("{expr:?} never fires: {e}")))?;
                Ok(Self::Cron { cron: Box::new(cron), tz })
            }
            (None, Some(every)) => {
                if every < min_interval {
                    return Err(invalid(
                        "interval",
                        format!("{every:?} is shorter than the minimum of {:?}", min_interval),
                    ));
                }
                Ok(Self::Every(every))
            }
        }
    }

    /// The first due time after `now`. An interval keeps its phase: due
    /// times are `due + k * interval`.
    pub fn next_after(&self, due: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Cron { cron, tz } => {
                cron.find_next_occurrence(&now.with_timezone(tz), false).ok().map(|t| t.with_timezone(&Utc))
            }
            Self::Every(every) => {
                let step = chrono::Duration::from_std(*every).ok()?;
                if due > now {
                    return Some(due);
                }
                let behind = (now - due).num_milliseconds() / step.num_milliseconds().max(1) + 1;
                Some(due + step * i32::try_from(behind).ok()?)
            }
        }
    }

    /// The first due time of a new (or resumed) schedule.
    pub fn first(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Self::Cron { .. } => self.next_after(now, now),
            Self::Every(every) => Some(now + chrono::Duration::from_std(*every).ok()?),
        }
    }
}

/// A schedule as an adapter received it.
#[derive(Clone, Debug, Default)]
pub struct ScheduleInput {
    pub name: String,
    pub cron: Option<String>,
    pub time_zone: String,
    pub interval: Option<Duration>,
    pub jitter: Duration,
    pub overlap: Option<Overlap>,
    pub template: Option<ScanRequestInput>,
    pub max_run: Option<Duration>,
}

/// Changes to a schedule: `None` keeps a field.
#[derive(Clone, Debug, Default)]
pub struct ScheduleUpdate {
    pub name: Option<String>,
    pub cron: Option<String>,
    pub time_zone: Option<String>,
    pub interval: Option<Duration>,
    pub jitter: Option<Duration>,
    pub overlap: Option<Overlap>,
    pub template: Option<ScanRequestInput>,
    pub max_run: Option<Duration>,
}

/// A schedule and its last runs.
#[derive(Clone, Debug)]
pub struct ScheduleView {
    pub record: ScheduleRecord,
    pub runs: Vec<RunRecord>,
}

fn invalid(field: &str, message: impl ToString) -> ScanError {
    ScanError::InvalidArgument { field: format!("schedule.{field}"), message: message.to_string() }
}

/// Whole seconds, rounded up (an interval of 1.5 s is stored as 2 s, not
/// as 1 or 0).
fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(i64::MAX)
}

/// A run's idempotency key: its schedule and due time.
fn run_key(id: Uuid, due: DateTime<Utc>) -> String {
    format!("schedule:{id}:{}", due.timestamp())
}

/// A random delay of at most `jitter` after `due`.
fn fire_time(due: DateTime<Utc>, jitter_secs: i64) -> DateTime<Utc> {
    if jitter_secs <= 0 {
        return due;
    }
    let ms = rand::random_range(0..=jitter_secs.saturating_mul(1000));
    due + chrono::Duration::milliseconds(ms)
}

/// Creates, changes and fires schedules.
#[derive(Clone, Debug)]
pub struct ScheduleManager {
    store: Store,
    scans: ScanManager,
}

impl ScheduleManager {
    pub fn new(store: Store, scans: ScanManager) -> Self {
        Self { store, scans }
    }

    fn min_interval(&self) -> Duration {
        self.scans.limits().min_schedule_interval
    }

    /// The template must plan (addresses resolve, exclusions leave some)
    /// and be inside the scope policy now.
    async fn check_template(&self, t: &ScanRequestInput) -> Result<serde_json::Value, ScanError> {
        let preview = self.scans.preview(t.clone()).await.map_err(|e| match e {
            ScanError::InvalidArgument { field, message } => {
                ScanError::InvalidArgument { field: format!("schedule.template.{field}"), message }
            }
            other => other,
        })?;
        if let Some(verdict) = preview.policy_verdict {
            return Err(ScanError::PermissionDenied(format!("schedule.template.targets: {verdict}")));
        }
        serde_json::to_value(ScanTemplate::from_input(t)).map_err(|e| StoreError::Corrupt(e.to_string()).into())
    }

    fn check_common(
        name: &str,
        jitter: Duration,
        max_run: Option<Duration>,
        cadence: &Cadence,
    ) -> Result<(), ScanError> {
        portfleet_core::text::check(name, 128).map_err(|e| invalid("name", e))?;
        if jitter > MAX_JITTER {
            return Err(invalid(
                "jitter",
                format!("{jitter:?} exceeds the maximum of {}h", MAX_JITTER.as_secs() / 3600),
            ));
        }
        if let Cadence::Every(every) = cadence
            && jitter >= *every
        {
            return Err(invalid("jitter", format!("{jitter:?} must be shorter than the interval ({every:?})")));
        }
        if max_run.is_some_and(|d| d < Duration::from_secs(1)) {
            return Err(invalid("max_run_duration", "at least one second"));
        }
        Ok(())
    }

    pub async fn create(&self, input: ScheduleInput) -> Result<ScheduleRecord, ScanError> {
        let cadence = Cadence::new(input.cron.as_deref(), &input.time_zone, input.interval, self.min_interval())?;
        Self::check_common(&input.name, input.jitter, input.max_run, &cadence)?;
        let template = input.template.ok_or_else(|| invalid("template", "a schedule needs a scan template"))?;
        let template = self.check_template(&template).await?;
        let now = Utc::now();
        let next = cadence.first(now).ok_or_else(|| invalid("cron", "never fires"))?;
        let jitter_secs = secs(input.jitter);
        let record = ScheduleRecord {
            id: Uuid::now_v7(),
            name: input.name.trim().to_string(),
            cron: input.cron.map(|c| c.trim().to_string()).filter(|c| !c.is_empty()),
            time_zone: if input.time_zone.trim().is_empty() { "UTC".into() } else { input.time_zone.trim().into() },
            interval_secs: matches!(cadence, Cadence::Every(_)).then(|| input.interval.map(secs)).flatten(),
            jitter_secs,
            overlap: input.overlap.unwrap_or(Overlap::Skip),
            template: Json(template),
            max_run_secs: input.max_run.map(secs),
            paused: false,
            next_run_at: Some(next),
            fire_at: Some(fire_time(next, jitter_secs)),
            created_at: now,
            updated_at: now,
        };
        let stored = self.store.insert_schedule(&record).await?;
        tracing::info!(schedule_id = %stored.id, name = %stored.name, next_run = %next, "schedule created");
        Ok(stored)
    }

    pub async fn get(&self, id: Uuid) -> Result<ScheduleView, ScanError> {
        let record = self.record(id).await?;
        let runs = self.store.schedule_runs(id, SHOWN_RUNS).await?;
        Ok(ScheduleView { record, runs })
    }

    async fn record(&self, id: Uuid) -> Result<ScheduleRecord, ScanError> {
        self.store.get_schedule(id).await?.ok_or_else(|| ScanError::NotFound(format!("schedule {id} not found")))
    }

    pub async fn list(&self, page: Page<Uuid>) -> Result<Paged<ScheduleRecord, Uuid>, ScanError> {
        Ok(self.store.list_schedules(page).await?)
    }

    pub async fn update(&self, id: Uuid, u: ScheduleUpdate) -> Result<ScheduleRecord, ScanError> {
        let template = match &u.template {
            Some(t) => Some(Json(self.check_template(t).await?)),
            None => None,
        };
        let min = self.min_interval();
        let updated = self
            .modify(id, |r| {
                let cadence_changed = u.cron.is_some() || u.interval.is_some() || u.time_zone.is_some();
                let (cron, interval) = match (&u.cron, u.interval) {
                    (Some(c), _) if !c.trim().is_empty() => (Some(c.clone()), None),
                    (_, Some(i)) if !i.is_zero() => (None, Some(i)),
                    _ => (r.cron.clone(), r.interval_secs.map(|s| Duration::from_secs(s.max(0) as u64))),
                };
                let time_zone = u.time_zone.clone().unwrap_or_else(|| r.time_zone.clone());
                let cadence = Cadence::new(cron.as_deref(), &time_zone, interval, min)?;
                let name = u.name.clone().unwrap_or_else(|| r.name.clone());
                let jitter = u.jitter.unwrap_or(Duration::from_secs(r.jitter_secs.max(0) as u64));
                let max_run = u.max_run.or(r.max_run_secs.map(|s| Duration::from_secs(s.max(0) as u64)));
                Self::check_common(&name, jitter, max_run, &cadence)?;
                if let Some(t) = &template {
                    r.template = t.clone();
                }
                r.name = name.trim().to_string();
                r.cron = cron.map(|c| c.trim().to_string());
                r.interval_secs = interval.map(secs);
                r.time_zone = if time_zone.trim().is_empty() { "UTC".into() } else { time_zone.trim().into() };
                r.jitter_secs = secs(jitter);
                r.max_run_secs = max_run.map(secs);
                if let Some(o) = u.overlap {
                    r.overlap = o;
                }
                if !r.paused {
                    if cadence_changed {
                        let next = cadence.first(Utc::now()).ok_or_else(|| invalid("cron", "never fires"))?;
                        r.next_run_at = Some(next);
                        r.fire_at = Some(fire_time(next, r.jitter_secs));
                    } else if u.jitter.is_some()
                        && let Some(next) = r.next_run_at
                    {
                        // The same due time, a new random start.
                        r.fire_at = Some(fire_time(next, r.jitter_secs));
                    }
                }
                Ok(true)
            })
            .await?;
        tracing::info!(schedule_id = %id, "schedule updated");
        Ok(updated)
    }

    /// Reads the schedule, lets `apply` change it (`false`: nothing to
    /// write) and writes it back if nothing else changed it meanwhile (a
    /// fire advancing it, another update); else reads it again.
    async fn modify(
        &self,
        id: Uuid,
        mut apply: impl FnMut(&mut ScheduleRecord) -> Result<bool, ScanError>,
    ) -> Result<ScheduleRecord, ScanError> {
        for _ in 0..5 {
            let mut r = self.record(id).await?;
            if !apply(&mut r)? {
                return Ok(r);
            }
            if let Some(saved) = self.store.update_schedule(&r).await? {
                return Ok(saved);
            }
        }
        Err(ScanError::FailedPrecondition(format!("schedule {id} kept changing while it was updated; try again")))
    }

    pub async fn delete(&self, id: Uuid) -> Result<(), ScanError> {
        if !self.store.delete_schedule(id).await? {
            return Err(ScanError::NotFound(format!("schedule {id} not found")));
        }
        tracing::info!(schedule_id = %id, "schedule deleted");
        Ok(())
    }

    /// Pausing a paused schedule (or resuming a running one) changes
    /// nothing.
    pub async fn set_paused(&self, id: Uuid, paused: bool) -> Result<ScheduleRecord, ScanError> {
        let updated = self
            .modify(id, |r| {
                if r.paused == paused {
                    return Ok(false);
                }
                r.paused = paused;
                if paused {
                    r.next_run_at = None;
                    r.fire_at = None;
                } else {
                    let next = cadence_of(r)?.first(Utc::now()).ok_or_else(|| invalid("cron", "never fires"))?;
                    r.next_run_at = Some(next);
                    r.fire_at = Some(fire_time(next, r.jitter_secs));
                }
                Ok(true)
            })
            .await?;
        tracing::info!(schedule_id = %id, paused, "schedule {}", if paused { "paused" } else { "resumed" });
        Ok(updated)
    }

    /// Fires what is due now; returns how many schedules it took.
    pub async fn fire_due(&self) -> Result<usize, ScanError> {
        let token = Uuid::new_v4();
        let claimed = self.store.claim_due_schedules(FIRE_BATCH, CLAIM_HOLD, token).await?;
        if claimed.is_empty() {
            return Ok(0);
        }
        let ids: Vec<Uuid> = claimed.iter().map(|s| s.id).collect();
        let fired = self.fire_claimed(&claimed, token).await;
        if fired.is_err() {
            // Let another pass (or controller) have them now, not in 90 s.
            let _ = self.store.finish_fires(&[], &[], &ids, token).await;
        }
        fired.map(|()| claimed.len())
    }

    async fn fire_claimed(&self, claimed: &[ScheduleRecord], token: Uuid) -> Result<(), ScanError> {
        let ids: Vec<Uuid> = claimed.iter().map(|s| s.id).collect();
        let previous: HashMap<Uuid, LastRun> =
            self.store.last_started_runs(&ids).await?.into_iter().map(|r| (r.schedule_id, r)).collect();
        // A run whose scan was stored but not recorded (a controller died
        // between the two) is that scan, whatever the overlap policy says.
        let keys: Vec<String> = claimed.iter().filter_map(|s| Some(run_key(s.id, s.next_run_at?))).collect();
        let stored: HashMap<String, Uuid> = self
            .store
            .scans_by_request_ids(&keys)
            .await?
            .into_iter()
            .filter_map(|r| Some((r.request_id?, r.id)))
            .collect();
        let now = Utc::now();
        let mut runs: Vec<NewRun> = Vec::new();
        let mut advances: Vec<Advance> = Vec::new();
        let mut postponed: Vec<(Uuid, DateTime<Utc>)> = Vec::new();
        // Runs to start: (schedule, due, its advance, the request).
        let mut starts: Vec<(Uuid, DateTime<Utc>, Advance, ScanRequestInput)> = Vec::new();
        for s in claimed {
            let Some(due) = s.next_run_at else { continue };
            let (cadence, template) = match cadence_of(s).and_then(|c| Ok((c, template_of(s)?))) {
                Ok(v) => v,
                Err(e) => {
                    // Recorded and moved on an hour, not retried at once
                    // by every controller.
                    tracing::error!(schedule_id = %s.id, error = %e, "schedule cannot fire");
                    let next = now + chrono::Duration::hours(1);
                    runs.push(NewRun {
                        schedule_id: s.id,
                        due_at: due,
                        outcome: RunOutcome::Failed,
                        scan_id: None,
                        error: Some(e.to_string()),
                    });
                    advances.push(Advance { id: s.id, due_at: due, next_run_at: next, fire_at: next });
                    continue;
                }
            };
            // Past due times collapse into this one run (a late start within
            // the jitter is not a missed slot).
            let from = now - chrono::Duration::seconds(s.jitter_secs);
            let next = cadence.next_after(due, from.max(due)).unwrap_or(now + chrono::Duration::days(1));
            let advance = Advance { id: s.id, due_at: due, next_run_at: next, fire_at: fire_time(next, s.jitter_secs) };
            let key = run_key(s.id, due);
            let last = previous.get(&s.id);
            if let Some(scan) = stored.get(&key).copied().or(last.filter(|l| l.due_at >= due).map(|l| l.scan_id)) {
                runs.push(NewRun {
                    schedule_id: s.id,
                    due_at: due,
                    outcome: RunOutcome::Started,
                    scan_id: Some(scan),
                    error: None,
                });
                advances.push(advance);
                continue;
            }
            let active = last.filter(|l| l.state.is_some_and(|st| st.is_active()));
            match (active, s.overlap) {
                (Some(_), Overlap::Skip) => {
                    runs.push(NewRun {
                        schedule_id: s.id,
                        due_at: due,
                        outcome: RunOutcome::Skipped,
                        scan_id: None,
                        error: Some("the previous run was still going".into()),
                    });
                    advances.push(advance);
                    continue;
                }
                (Some(_), Overlap::Queue) => {
                    postponed.push((s.id, due));
                    continue;
                }
                (Some(l), Overlap::Cancel) => {
                    if let Err(e) = self.scans.cancel(l.scan_id).await {
                        tracing::warn!(schedule_id = %s.id, scan_id = %l.scan_id, error = %e, "cannot cancel the previous run");
                    }
                }
                _ => {}
            }
            let mut input = template;
            input.request_id = key;
            input.labels.insert(SCHEDULE_LABEL.into(), s.id.to_string());
            input.schedule_id = Some(s.id);
            input.origin = Origin::Schedule;
            input.deadline = s.max_run_secs.map(|secs| now + chrono::Duration::seconds(secs.max(1)));
            starts.push((s.id, due, advance, input));
        }
        if !starts.is_empty() {
            let inputs: Vec<ScanRequestInput> = starts.iter().map(|(.., i)| i.clone()).collect();
            let outcomes = self.scans.create_many(inputs).await?;
            for ((id, due, advance, _), outcome) in starts.into_iter().zip(outcomes) {
                match outcome {
                    Ok((scan, _)) => {
                        metrics::counter!("portfleet_schedule_runs_total", "outcome" => "started").increment(1);
                        let delay = (Utc::now() - due).num_milliseconds().max(0) as f64 / 1000.0;
                        metrics::histogram!("portfleet_schedule_fire_delay_seconds").record(delay);
                        runs.push(NewRun {
                            schedule_id: id,
                            due_at: due,
                            outcome: RunOutcome::Started,
                            scan_id: Some(scan.id),
                            error: None,
                        });
                        advances.push(advance);
                    }
                    // The store failing is tried again; a request that no
                    // longer plans (a policy change, names gone) is a failed
                    // run, and the schedule goes on.
                    Err(ScanError::Store(e)) if e.is_transient() => {
                        tracing::warn!(schedule_id = %id, error = %e, "schedule run not started; trying again");
                    }
                    Err(e) => {
                        metrics::counter!("portfleet_schedule_runs_total", "outcome" => "failed").increment(1);
                        tracing::warn!(schedule_id = %id, error = %e, "schedule run failed");
                        runs.push(NewRun {
                            schedule_id: id,
                            due_at: due,
                            outcome: RunOutcome::Failed,
                            scan_id: None,
                            error: Some(e.to_string()),
                        });
                        advances.push(advance);
                    }
                }
            }
        }
        let skipped = runs.iter().filter(|r| r.outcome == RunOutcome::Skipped).count() as u64;
        metrics::counter!("portfleet_schedule_runs_total", "outcome" => "skipped").increment(skipped);
        let recheck = now + chrono::Duration::from_std(QUEUE_RECHECK).unwrap_or_default();
        self.store.postpone_schedules(&postponed, recheck, token).await?;
        self.store.finish_fires(&runs, &advances, &ids, token).await?;
        Ok(())
    }

    /// Fires schedules and ends scans past their deadlines until `cancel`:
    /// wakes at the next fire time, at least once a second.
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let mut busy = false;
            match self.fire_due().await {
                Ok(n) => busy = n as i64 >= FIRE_BATCH,
                Err(e) => tracing::warn!(error = %e, "cannot fire schedules; retrying"),
            }
            match self.store.expire_deadlines(100).await {
                Ok(ids) => {
                    for id in &ids {
                        tracing::info!(scan_id = %id, "scan cancelled: its deadline passed");
                    }
                    busy |= ids.len() >= 100;
                }
                Err(e) => tracing::warn!(error = %e, "cannot end scans past their deadlines; retrying"),
            }
            let wait = if busy {
                Duration::ZERO
            } else {
                match self.store.next_schedule_fire().await {
                    Ok(Some(at)) => (at - Utc::now())
                        .to_std()
                        .unwrap_or(Duration::ZERO)
                        .clamp(Duration::from_millis(20), Duration::from_secs(1)),
                    _ => Duration::from_secs(1),
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

fn cadence_of(r: &ScheduleRecord) -> Result<Cadence, ScanError> {
    let every = r.interval_secs.map(|s| Duration::from_secs(s.max(0) as u64));
    // Checked against the minimum when stored.
    Cadence::new(r.cron.as_deref(), &r.time_zone, every, Duration::ZERO)
        .map_err(|e| StoreError::Corrupt(format!("schedule {}: {e}", r.id)).into())
}

fn template_of(r: &ScheduleRecord) -> Result<ScanRequestInput, ScanError> {
    let t: ScanTemplate = serde_json::from_value(r.template.0.clone())
        .map_err(|e| StoreError::Corrupt(format!("schedule {} template: {e}", r.id)))?;
    t.to_input().map_err(|e| StoreError::Corrupt(format!("schedule {} template: {e}", r.id)).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().to_utc()
    }

    #[test]
    fn intervals_keep_their_phase_and_collapse_missed_slots() {
        let every = Cadence::new(None, "", Some(Duration::from_secs(600)), MIN).unwrap();
        let due = at("2026-01-01T00:00:00Z");
        // On time: the next slot.
        assert_eq!(every.next_after(due, at("2026-01-01T00:00:01Z")), Some(at("2026-01-01T00:10:00Z")));
        // After 35 minutes down: one run for the missed slots, then the
        // next slot after now.
        assert_eq!(every.next_after(due, at("2026-01-01T00:35:00Z")), Some(at("2026-01-01T00:40:00Z")));
    }

    #[test]
    fn cron_runs_in_its_time_zone() {
        let daily = Cadence::new(Some("30 9 * * *"), "Europe/Paris", None, MIN).unwrap();
        // 09:30 in Paris is 08:30 UTC in winter, 07:30 in summer.
        let now = at("2026-01-10T12:00:00Z");
        assert_eq!(daily.next_after(now, now), Some(at("2026-01-11T08:30:00Z")));
        let now = at("2026-07-10T12:00:00Z");
        assert_eq!(daily.next_after(now, now), Some(at("2026-07-11T07:30:00Z")));
    }

    #[test]
    fn bad_cadences_name_their_field() {
        let err = |c: Option<&str>, tz: &str, i: Option<u64>| {
            Cadence::new(c, tz, i.map(Duration::from_secs), MIN).unwrap_err().to_string()
        };
        assert!(err(Some("61 * * * *"), "", None).starts_with("schedule.cron: \"61 * * * *\""));
        assert!(err(Some("* * *"), "", None).starts_with("schedule.cron: \"* * *\": five fields"));
        assert!(err(Some("0 0 31 2 *"), "", None).contains("never fires"), "{}", err(Some("0 0 31 2 *"), "", None));
        assert!(err(Some("* * * * *"), "Mars/Olympus", None).starts_with("schedule.time_zone: \"Mars/Olympus\""));
        assert_eq!(err(None, "", Some(59)), "schedule.interval: 59s is shorter than the minimum of 60s");
        assert_eq!(
            err(Some("* * * * *"), "", Some(60)),
            "schedule.interval: give a cron expression or an interval, not both"
        );
        assert_eq!(err(None, "", None), "schedule.cron: give a cron expression or an interval");
    }

    #[test]
    fn templates_round_trip() {
        let input = ScanRequestInput {
            targets: vec!["192.0.2.0/24".into()],
            ports: "80,443".into(),
            priority: Some(7),
            exclude: vec!["192.0.2.7".into()],
            ip_version: Some(IpVersion::V4),
            cdn_policy: Some(CdnPolicy::WebPorts),
            ..Default::default()
        };
        let t = ScanTemplate::from_input(&input);
        let json = serde_json::to_value(&t).unwrap();
        let back: ScanTemplate = serde_json::from_value(json).unwrap();
        assert_eq!(back, t);
        let again = back.to_input().unwrap();
        assert_eq!(again.targets, input.targets);
        assert_eq!(again.cdn_policy, Some(CdnPolicy::WebPorts));
        assert_eq!(again.ip_version, Some(IpVersion::V4));
    }
}
