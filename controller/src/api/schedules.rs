//! The schedule RPCs: request checks and conversions; the work is in
//! `crate::schedules`.

use std::time::Duration;

use portfleet_proto::v1 as pb;
use tonic::{Request, Response, Status};

use super::{ScanApi, convert, page, to_status};
use crate::{
    auth::Scope,
    scans::ScanRequestInput,
    schedules::{ScanTemplate, ScheduleInput, ScheduleUpdate, ScheduleView},
    store::{Overlap, Page, RunOutcome, RunRecord, ScheduleRecord},
};

fn duration(field: &str, d: Option<prost_types::Duration>) -> Result<Option<Duration>, Status> {
    match d {
        None => Ok(None),
        Some(d) if d.seconds < 0 || d.nanos < 0 => {
            Err(Status::invalid_argument(format!("schedule.{field}: must not be negative")))
        }
        Some(d) => Ok(Some(Duration::new(d.seconds as u64, d.nanos as u32))),
    }
}

fn overlap(value: i32) -> Result<Option<Overlap>, Status> {
    Ok(match pb::OverlapPolicy::try_from(value) {
        Ok(pb::OverlapPolicy::Unspecified) => None,
        Ok(pb::OverlapPolicy::Skip) => Some(Overlap::Skip),
        Ok(pb::OverlapPolicy::Queue) => Some(Overlap::Queue),
        Ok(pb::OverlapPolicy::Cancel) => Some(Overlap::Cancel),
        Err(_) => return Err(Status::invalid_argument(format!("schedule.overlap: unknown value {value}"))),
    })
}

/// A template is a scan request without what belongs to one run.
fn template(t: pb::CreateScanRequest) -> Result<ScanRequestInput, Status> {
    let refuse = |field: &str, why: &str| Err(Status::invalid_argument(format!("schedule.template.{field}: {why}")));
    if !t.request_id.trim().is_empty() {
        return refuse("request_id", "each run has its own (the schedule and its due time)");
    }
    if t.deadline.is_some() {
        return refuse("deadline", "use the schedule's max_run_duration (each run's deadline)");
    }
    if t.validate_only {
        return refuse("validate_only", "must be unset");
    }
    ScanRequestInput::try_from(t).map_err(|s| Status::invalid_argument(format!("schedule.template.{}", s.message())))
}

fn seconds(s: i64) -> prost_types::Duration {
    prost_types::Duration { seconds: s, nanos: 0 }
}

fn schedule_to_pb(r: ScheduleRecord, runs: Vec<RunRecord>) -> pb::Schedule {
    let template = serde_json::from_value::<ScanTemplate>(r.template.0)
        .ok()
        .and_then(|t| t.to_input().ok())
        .map(|i| template_to_pb(&i));
    pb::Schedule {
        id: r.id.to_string(),
        name: r.name,
        cron: r.cron.unwrap_or_default(),
        time_zone: r.time_zone,
        interval: r.interval_secs.map(seconds),
        jitter: (r.jitter_secs > 0).then(|| seconds(r.jitter_secs)),
        overlap: match r.overlap {
            Overlap::Skip => pb::OverlapPolicy::Skip,
            Overlap::Queue => pb::OverlapPolicy::Queue,
            Overlap::Cancel => pb::OverlapPolicy::Cancel,
        } as i32,
        template,
        max_run_duration: r.max_run_secs.map(seconds),
        paused: r.paused,
        next_run_time: r.next_run_at.map(convert::timestamp),
        create_time: Some(convert::timestamp(r.created_at)),
        update_time: Some(convert::timestamp(r.updated_at)),
        runs: runs.into_iter().map(run_to_pb).collect(),
    }
}

fn template_to_pb(i: &ScanRequestInput) -> pb::CreateScanRequest {
    pb::CreateScanRequest {
        targets: i.targets.clone(),
        target_group: i.target_group.clone(),
        ports: i.ports.clone(),
        scan_type: i.scan_type.map_or(pb::ScanType::Unspecified, |t| convert::scan_type_to_pb(t.as_str())) as i32,
        rate: i.rate,
        retries: i.retries,
        request_id: String::new(),
        labels: i.labels.clone().into_iter().collect(),
        agent_selector: i.agent_selector.clone().into_iter().collect(),
        allow_connect_fallback: i.allow_connect_fallback,
        identify: i.identify,
        port_threshold: i.port_threshold,
        priority: i.priority,
        max_agents: i.max_agents,
        max_parallel_shards: i.max_parallel_shards,
        exclude: i.exclude.clone(),
        exclude_ports: i.exclude_ports.clone(),
        ip_version: i.ip_version.map_or(pb::IpVersion::Unspecified, convert::ip_version_to_pb) as i32,
        scan_all_ips: i.scan_all_ips,
        cdn_policy: i.cdn_policy.map_or(pb::CdnPolicy::Unspecified, convert::cdn_policy_to_pb) as i32,
        deadline: None,
        validate_only: false,
    }
}

fn run_to_pb(r: RunRecord) -> pb::ScheduleRun {
    pb::ScheduleRun {
        due_time: Some(convert::timestamp(r.due_at)),
        fire_time: Some(convert::timestamp(r.fired_at)),
        outcome: match r.outcome {
            RunOutcome::Started => pb::RunOutcome::Started,
            RunOutcome::Skipped => pb::RunOutcome::Skipped,
            RunOutcome::Failed => pb::RunOutcome::Failed,
        } as i32,
        scan_id: r.scan_id.map(|id| id.to_string()).unwrap_or_default(),
        scan_state: r.scan_state.0.map_or(pb::ScanState::Unspecified, convert::scan_state_to_pb) as i32,
        error: r.error.unwrap_or_default(),
    }
}

fn view_to_pb(v: ScheduleView) -> pb::Schedule {
    schedule_to_pb(v.record, v.runs)
}

fn given(s: String) -> Option<String> {
    Some(s).filter(|s| !s.trim().is_empty())
}

impl ScanApi {
    pub(super) async fn do_create_schedule(
        &self,
        request: Request<pb::CreateScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.auth.authorize(request.metadata(), Scope::Scan, "CreateSchedule").await?;
        let s = request.into_inner().schedule.ok_or_else(|| Status::invalid_argument("schedule: required"))?;
        let input = ScheduleInput {
            name: s.name,
            cron: given(s.cron),
            time_zone: s.time_zone,
            interval: duration("interval", s.interval)?,
            jitter: duration("jitter", s.jitter)?.unwrap_or_default(),
            overlap: overlap(s.overlap)?,
            template: s.template.map(template).transpose()?,
            max_run: duration("max_run_duration", s.max_run_duration)?,
        };
        let record = self.schedules.create(input).await.map_err(to_status)?;
        Ok(Response::new(schedule_to_pb(record, Vec::new())))
    }

    pub(super) async fn do_list_schedules(
        &self,
        request: Request<pb::ListSchedulesRequest>,
    ) -> Result<Response<pb::ListSchedulesResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Read, "ListSchedules").await?;
        let r = request.into_inner();
        let page = Page { after: page::decode("schedules", &r.page_token)?, limit: page::size(r.page_size, 100, 1000) };
        let paged = self.schedules.list(page).await.map_err(to_status)?;
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: paged.items.into_iter().map(|s| schedule_to_pb(s, Vec::new())).collect(),
            next_page_token: page::encode("schedules", paged.next),
        }))
    }

    pub(super) async fn do_get_schedule(
        &self,
        request: Request<pb::GetScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.auth.authorize(request.metadata(), Scope::Read, "GetSchedule").await?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        Ok(Response::new(view_to_pb(self.schedules.get(id).await.map_err(to_status)?)))
    }

    pub(super) async fn do_update_schedule(
        &self,
        request: Request<pb::UpdateScheduleRequest>,
    ) -> Result<Response<pb::Schedule>, Status> {
        self.auth.authorize(request.metadata(), Scope::Scan, "UpdateSchedule").await?;
        let s = request.into_inner().schedule.ok_or_else(|| Status::invalid_argument("schedule: required"))?;
        let id = convert::parse_id("schedule.id", &s.id)?;
        let update = ScheduleUpdate {
            name: given(s.name),
            cron: given(s.cron),
            time_zone: given(s.time_zone),
            interval: duration("interval", s.interval)?,
            jitter: duration("jitter", s.jitter)?,
            overlap: overlap(s.overlap)?,
            template: s.template.map(template).transpose()?,
            max_run: duration("max_run_duration", s.max_run_duration)?,
        };
        let record = self.schedules.update(id, update).await.map_err(to_status)?;
        Ok(Response::new(schedule_to_pb(record, Vec::new())))
    }

    pub(super) async fn do_delete_schedule(
        &self,
        request: Request<pb::DeleteScheduleRequest>,
    ) -> Result<Response<pb::DeleteScheduleResponse>, Status> {
        self.auth.authorize(request.metadata(), Scope::Scan, "DeleteSchedule").await?;
        let id = convert::parse_id("id", &request.get_ref().id)?;
        self.schedules.delete(id).await.map_err(to_status)?;
        Ok(Response::new(pb::DeleteScheduleResponse {}))
    }

    /// PauseSchedule and ResumeSchedule.
    pub(super) async fn do_set_paused(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        id: &str,
        paused: bool,
    ) -> Result<Response<pb::Schedule>, Status> {
        let method = if paused { "PauseSchedule" } else { "ResumeSchedule" };
        self.auth.authorize(metadata, Scope::Scan, method).await?;
        let id = convert::parse_id("id", id)?;
        let record = self.schedules.set_paused(id, paused).await.map_err(to_status)?;
        Ok(Response::new(schedule_to_pb(record, Vec::new())))
    }
}
