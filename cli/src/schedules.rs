//! `schedules`: recurring scans. Creating and changing one needs a token
//! with the scan scope, listing and showing one the read scope.

use std::{
    io::{self, Write},
    time::Duration,
};

use clap::{Args, Subcommand, ValueEnum};
use portfleet_proto::{auth::ApiClient, v1 as pb};

use crate::{
    PAGE, ScanSpec,
    show::{self, Table},
    status,
};

#[derive(Subcommand, Debug)]
pub enum SchedulesCommand {
    /// Create a schedule and print its id and next run.
    ///
    /// Give --cron (five fields, in --tz) or --every. The scan flags are
    /// `scan`'s; the template is checked, scope policy included, now.
    Create {
        #[command(flatten)]
        when: When,
        #[command(flatten)]
        spec: ScanSpec,
    },
    /// List schedules.
    List,
    /// Show a schedule: its next run and its last runs.
    Get { id: String },
    /// Change a schedule: the flags given replace its fields (scan flags
    /// after --template replace the whole template).
    Update {
        id: String,
        #[command(flatten)]
        when: When,
        /// Replace the scan template with the scan flags that follow.
        #[arg(long)]
        template: bool,
        #[command(flatten)]
        spec: ScanSpec,
    },
    /// Stop firing a schedule (a running run goes on).
    Pause { id: String },
    /// Fire a paused schedule again, from its next due time after now.
    Resume { id: String },
    /// Delete a schedule (its runs' scans stay).
    Delete { id: String },
}

/// When a schedule fires and what it does on overlap.
#[derive(Args, Debug)]
pub struct When {
    /// A name to recognise it by.
    #[arg(long)]
    pub name: Option<String>,
    /// Cron expression: minute hour day-of-month month day-of-week
    /// ("0 3 * * *": 03:00 every day).
    #[arg(long)]
    pub cron: Option<String>,
    /// The cron expression's IANA time zone (Europe/Paris). Default UTC.
    #[arg(long)]
    pub tz: Option<String>,
    /// Or an interval (at least 1m): 15m, 6h, 1d.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub every: Option<Duration>,
    /// Start each run at a random delay of at most this after its due time.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub jitter: Option<Duration>,
    /// A run due while the previous one still runs: skip it (default),
    /// queue it, or cancel the previous one.
    #[arg(long, value_enum)]
    pub overlap: Option<OverlapArg>,
    /// Cancel each run (keeping what it found) after this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub max_run: Option<Duration>,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum OverlapArg {
    Skip,
    Queue,
    Cancel,
}

fn duration(d: Option<Duration>) -> Option<prost_types::Duration> {
    d.map(|d| prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 })
}

impl When {
    fn schedule(&self) -> pb::Schedule {
        pb::Schedule {
            name: self.name.clone().unwrap_or_default(),
            cron: self.cron.clone().unwrap_or_default(),
            time_zone: self.tz.clone().unwrap_or_default(),
            interval: duration(self.every),
            jitter: duration(self.jitter),
            overlap: match self.overlap {
                None => pb::OverlapPolicy::Unspecified,
                Some(OverlapArg::Skip) => pb::OverlapPolicy::Skip,
                Some(OverlapArg::Queue) => pb::OverlapPolicy::Queue,
                Some(OverlapArg::Cancel) => pb::OverlapPolicy::Cancel,
            } as i32,
            max_run_duration: duration(self.max_run),
            ..Default::default()
        }
    }
}

pub async fn run(c: &mut ApiClient, command: SchedulesCommand, headers: bool) -> Result<i32, String> {
    let mut out = io::stdout().lock();
    match command {
        SchedulesCommand::Create { when, spec } => {
            let schedule = pb::Schedule { template: Some(spec.request()?), ..when.schedule() };
            let s = c
                .create_schedule(pb::CreateScheduleRequest { schedule: Some(schedule) })
                .await
                .map_err(status)?
                .into_inner();
            let _ = show::fields(&mut out, &[("id", s.id.clone()), ("next run", show::time(s.next_run_time.as_ref()))]);
        }
        SchedulesCommand::List => list(c, &mut out, headers).await?,
        SchedulesCommand::Get { id } => {
            let s = c.get_schedule(pb::GetScheduleRequest { id: id.clone() }).await.map_err(|e| named(&id, e))?;
            let s = s.into_inner();
            let _ = show::fields(&mut out, &fields(&s));
            let mut table = Table::new(RUN_COLUMNS, headers);
            let rows: Vec<Vec<String>> = s.runs.iter().map(run_row).collect();
            let _ = table.page(&mut out, &rows);
        }
        SchedulesCommand::Update { id, when, template, spec } => {
            let schedule = pb::Schedule {
                id: id.clone(),
                template: if template { Some(spec.request()?) } else { None },
                ..when.schedule()
            };
            let s = c
                .update_schedule(pb::UpdateScheduleRequest { schedule: Some(schedule) })
                .await
                .map_err(|e| named(&id, e))?
                .into_inner();
            let _ = show::fields(&mut out, &fields(&s));
        }
        SchedulesCommand::Pause { id } => {
            let s = c.pause_schedule(pb::PauseScheduleRequest { id: id.clone() }).await.map_err(|e| named(&id, e))?;
            let _ = writeln!(out, "paused {}", s.into_inner().id);
        }
        SchedulesCommand::Resume { id } => {
            let s = c.resume_schedule(pb::ResumeScheduleRequest { id: id.clone() }).await.map_err(|e| named(&id, e))?;
            let s = s.into_inner();
            let _ = writeln!(out, "resumed {}: next run {}", s.id, show::time(s.next_run_time.as_ref()));
        }
        SchedulesCommand::Delete { id } => {
            c.delete_schedule(pb::DeleteScheduleRequest { id: id.clone() }).await.map_err(|e| named(&id, e))?;
            let _ = writeln!(out, "deleted {id}");
        }
    }
    Ok(0)
}

fn named(id: &str, e: tonic::Status) -> String {
    format!("schedule {}: {}", portfleet_core::text::echo(id), status(e))
}

fn cadence(s: &pb::Schedule) -> String {
    if !s.cron.is_empty() {
        format!("cron {:?} {}", show::clean(&s.cron), show::clean(&s.time_zone))
    } else {
        let every = s.interval.map_or(Duration::ZERO, |d| Duration::from_secs(d.seconds.max(0) as u64));
        format!("every {}", show::duration(every))
    }
}

fn overlap(v: i32) -> &'static str {
    match pb::OverlapPolicy::try_from(v) {
        Ok(pb::OverlapPolicy::Queue) => "queue",
        Ok(pb::OverlapPolicy::Cancel) => "cancel",
        _ => "skip",
    }
}

fn fields(s: &pb::Schedule) -> Vec<(&'static str, String)> {
    let t = s.template.clone().unwrap_or_default();
    let secs =
        |d: Option<prost_types::Duration>| d.map(|d| show::duration(Duration::from_secs(d.seconds.max(0) as u64)));
    vec![
        ("id", s.id.clone()),
        ("name", show::clean(&s.name)),
        ("when", cadence(s)),
        ("jitter", secs(s.jitter).unwrap_or_else(|| "-".into())),
        ("overlap", overlap(s.overlap).into()),
        ("max run", secs(s.max_run_duration).unwrap_or_else(|| "-".into())),
        ("paused", s.paused.to_string()),
        ("next run", show::time(s.next_run_time.as_ref())),
        ("targets", show::clean(&t.targets.join(","))),
        ("target group", show::clean(&t.target_group)),
        ("ports", show::clean(&t.ports)),
        ("priority", t.priority.map_or_else(|| "5".into(), |p| p.to_string())),
    ]
}

const COLUMNS: &[&str] = &["ID", "NAME", "WHEN", "OVERLAP", "PAUSED", "NEXT RUN"];
const RUN_COLUMNS: &[&str] = &["DUE", "FIRED", "OUTCOME", "SCAN", "STATE", "ERROR"];

fn run_row(r: &pb::ScheduleRun) -> Vec<String> {
    let outcome = match pb::RunOutcome::try_from(r.outcome) {
        Ok(pb::RunOutcome::Started) => "started",
        Ok(pb::RunOutcome::Skipped) => "skipped",
        Ok(pb::RunOutcome::Failed) => "failed",
        _ => "-",
    };
    let state = if r.scan_id.is_empty() { "-" } else { show::state_name(r.scan_state) };
    vec![
        show::time(r.due_time.as_ref()),
        show::time(r.fire_time.as_ref()),
        outcome.into(),
        if r.scan_id.is_empty() { "-".into() } else { r.scan_id.clone() },
        state.into(),
        if r.error.is_empty() { "-".into() } else { show::clean(&r.error) },
    ]
}

async fn list(c: &mut ApiClient, out: &mut impl Write, headers: bool) -> Result<(), String> {
    let mut table = Table::new(COLUMNS, headers);
    let mut token = String::new();
    loop {
        let page = c
            .list_schedules(pb::ListSchedulesRequest { page_size: PAGE, page_token: token })
            .await
            .map_err(status)?
            .into_inner();
        let rows: Vec<Vec<String>> = page
            .schedules
            .iter()
            .map(|s| {
                vec![
                    s.id.clone(),
                    show::clean(&s.name),
                    cadence(s),
                    overlap(s.overlap).into(),
                    s.paused.to_string(),
                    show::time(s.next_run_time.as_ref()),
                ]
            })
            .collect();
        if table.page(out, &rows).is_err() || page.next_page_token.is_empty() || rows.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    if table.rows() == 0 {
        eprintln!("no schedules");
    }
    Ok(())
}
