//! Conversions between wire types and domain/store types. Inbound
//! conversions validate; outbound ones cannot fail.

use chrono::{DateTime, Utc};
use portfleet_core::{CdnPolicy, ScanType};
use portfleet_proto::v1 as pb;
use tonic::Status;
use uuid::Uuid;

use crate::{
    scans::{IpVersion, ScanPreview, ScanRequestInput},
    store::{AgentRecord, AgentState, PortState, ResultRecord, ScanRecord, ScanState, TargetRecord},
};

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

pub fn parse_id(field: &str, value: &str) -> Result<Uuid, Status> {
    Uuid::try_parse(value.trim())
        .map_err(|_| Status::invalid_argument(format!("{field}: {value:?} is not a valid id (a UUID)")))
}

pub fn scan_type_from_pb(value: i32) -> Result<Option<ScanType>, Status> {
    match pb::ScanType::try_from(value) {
        Ok(pb::ScanType::Unspecified) => Ok(None),
        Ok(pb::ScanType::Syn) => Ok(Some(ScanType::Syn)),
        Ok(pb::ScanType::Connect) => Ok(Some(ScanType::Connect)),
        Err(_) => Err(Status::invalid_argument(format!("scan_type: unknown value {value}"))),
    }
}

pub fn scan_type_to_pb(value: &str) -> pb::ScanType {
    match ScanType::parse(value) {
        Some(ScanType::Syn) => pb::ScanType::Syn,
        Some(ScanType::Connect) => pb::ScanType::Connect,
        None => pb::ScanType::Unspecified,
    }
}

pub fn scan_state_from_pb(value: i32) -> Result<Option<ScanState>, Status> {
    Ok(match pb::ScanState::try_from(value) {
        Ok(pb::ScanState::Unspecified) => None,
        Ok(pb::ScanState::Pending) => Some(ScanState::Pending),
        Ok(pb::ScanState::Running) => Some(ScanState::Running),
        Ok(pb::ScanState::Completed) => Some(ScanState::Completed),
        Ok(pb::ScanState::Cancelled) => Some(ScanState::Cancelled),
        Ok(pb::ScanState::Failed) => Some(ScanState::Failed),
        Err(_) => return Err(Status::invalid_argument(format!("state: unknown value {value}"))),
    })
}

pub fn scan_state_to_pb(state: ScanState) -> pb::ScanState {
    match state {
        ScanState::Pending => pb::ScanState::Pending,
        ScanState::Running => pb::ScanState::Running,
        ScanState::Completed => pb::ScanState::Completed,
        ScanState::Cancelled => pb::ScanState::Cancelled,
        ScanState::Failed => pb::ScanState::Failed,
    }
}

impl TryFrom<pb::CreateScanRequest> for ScanRequestInput {
    type Error = Status;

    fn try_from(r: pb::CreateScanRequest) -> Result<Self, Status> {
        Ok(Self {
            scan_type: scan_type_from_pb(r.scan_type)?,
            targets: r.targets,
            target_group: r.target_group,
            ports: r.ports,
            rate: r.rate,
            retries: r.retries,
            request_id: r.request_id,
            labels: r.labels.into_iter().collect(),
            agent_selector: r.agent_selector.into_iter().collect(),
            allow_connect_fallback: r.allow_connect_fallback,
            identify: r.identify,
            port_threshold: r.port_threshold,
            priority: r.priority,
            max_agents: r.max_agents,
            max_parallel_shards: r.max_parallel_shards,
            exclude: r.exclude,
            exclude_ports: r.exclude_ports,
            ip_version: ip_version_from_pb(r.ip_version)?,
            scan_all_ips: r.scan_all_ips,
            cdn_policy: cdn_policy_from_pb(r.cdn_policy)?,
            deadline: r.deadline.map(|t| time_from_pb("deadline", t)).transpose()?,
            ..Default::default()
        })
    }
}

pub fn time_from_pb(field: &str, t: prost_types::Timestamp) -> Result<DateTime<Utc>, Status> {
    DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
        .ok_or_else(|| Status::invalid_argument(format!("{field}: not a valid time")))
}

pub fn ip_version_from_pb(value: i32) -> Result<Option<IpVersion>, Status> {
    Ok(match pb::IpVersion::try_from(value) {
        Ok(pb::IpVersion::Unspecified) => None,
        Ok(pb::IpVersion::IpVersion4) => Some(IpVersion::V4),
        Ok(pb::IpVersion::IpVersion6) => Some(IpVersion::V6),
        Ok(pb::IpVersion::Both) => Some(IpVersion::Both),
        Err(_) => return Err(Status::invalid_argument(format!("ip_version: unknown value {value}"))),
    })
}

pub fn ip_version_to_pb(v: IpVersion) -> pb::IpVersion {
    match v {
        IpVersion::Both => pb::IpVersion::Both,
        IpVersion::V4 => pb::IpVersion::IpVersion4,
        IpVersion::V6 => pb::IpVersion::IpVersion6,
    }
}

pub fn cdn_policy_from_pb(value: i32) -> Result<Option<CdnPolicy>, Status> {
    Ok(match pb::CdnPolicy::try_from(value) {
        Ok(pb::CdnPolicy::Unspecified) => None,
        Ok(pb::CdnPolicy::All) => Some(CdnPolicy::All),
        Ok(pb::CdnPolicy::WebPorts) => Some(CdnPolicy::WebPorts),
        Ok(pb::CdnPolicy::Skip) => Some(CdnPolicy::Skip),
        Err(_) => return Err(Status::invalid_argument(format!("cdn_policy: unknown value {value}"))),
    })
}

pub fn cdn_policy_to_pb(p: CdnPolicy) -> pb::CdnPolicy {
    match p {
        CdnPolicy::All => pb::CdnPolicy::All,
        CdnPolicy::WebPorts => pb::CdnPolicy::WebPorts,
        CdnPolicy::Skip => pb::CdnPolicy::Skip,
    }
}

pub fn duration_to_pb(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

/// A `validate_only` answer: a Scan with no id, its request as given and
/// its plan.
pub fn preview_to_pb(request: pb::CreateScanRequest, p: ScanPreview) -> pb::Scan {
    pb::Scan {
        port_count: portfleet_core::PortSet::parse(&p.ports).map_or(0, |s| s.len()),
        address_count: p.address_count,
        probes_planned: p.probes,
        shard_count: p.shard_count,
        request: Some(request),
        plan: Some(pb::ScanPlan {
            address_ranges: p.address_ranges,
            address_count: p.address_count,
            probes: p.probes,
            shard_count: p.shard_count,
            resolved: p
                .resolved
                .into_iter()
                .map(|(hostname, addrs)| pb::ResolvedName {
                    hostname,
                    addresses: addrs.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            excluded_addresses: p.excluded,
            cdn: p
                .cdn
                .into_iter()
                .map(|c| pb::CdnRange {
                    address: c.range,
                    provider: c.provider.into(),
                    policy: c.policy.as_str().into(),
                })
                .collect(),
            allowed: p.policy_verdict.is_none(),
            policy_verdict: p.policy_verdict.unwrap_or_default(),
            capable_agents: p.capable_agents,
            capable_agent_count: p.capable_agent_count,
            estimated_duration: Some(duration_to_pb(p.estimated)),
        }),
        ..Default::default()
    }
}

impl From<ScanRecord> for pb::Scan {
    fn from(s: ScanRecord) -> Self {
        let eta = eta(&s);
        pb::Scan {
            id: s.id.to_string(),
            state: scan_state_to_pb(s.state) as i32,
            request: Some(pb::CreateScanRequest {
                targets: s.targets,
                target_group: s.target_group,
                ports: s.ports,
                scan_type: scan_type_to_pb(&s.scan_type) as i32,
                rate: s.rate as u32,
                retries: Some(s.retries as u32),
                request_id: s.request_id.unwrap_or_default(),
                labels: s.labels.0.into_iter().collect(),
                agent_selector: s.agent_selector.0.into_iter().collect(),
                allow_connect_fallback: s.allow_connect_fallback,
                identify: Some(s.identify),
                port_threshold: Some(s.port_threshold as u32),
                priority: Some(s.priority as u32),
                max_agents: s.max_agents as u32,
                max_parallel_shards: s.max_parallel_shards as u32,
                exclude: s.shaping.exclude,
                exclude_ports: s.shaping.exclude_ports,
                ip_version: ip_version_to_pb(IpVersion::from_i16(s.shaping.ip_version)) as i32,
                scan_all_ips: Some(s.shaping.scan_all_ips),
                cdn_policy: cdn_policy_to_pb(CdnPolicy::parse(&s.shaping.cdn_policy).unwrap_or_default()) as i32,
                deadline: s.shaping.deadline.map(timestamp),
                validate_only: false,
            }),
            address_count: s.address_count as u64,
            port_count: s.port_count as u32,
            probes_planned: s.probes_planned as u64,
            probes_done: s.probes_done as u64,
            open_ports: s.open_ports as u64,
            shard_count: s.shard_count as u32,
            create_time: Some(timestamp(s.created_at)),
            start_time: s.started_at.map(timestamp),
            end_time: s.finished_at.map(timestamp),
            update_time: Some(timestamp(s.updated_at)),
            error: s.error.unwrap_or_default(),
            eta,
            waiting_reason: s.waiting_reason.unwrap_or_default(),
            plan: None,
            deadline_exceeded: s.deadline_exceeded,
            schedule_id: s.schedule_id.map(|id| id.to_string()).unwrap_or_default(),
        }
    }
}

/// Extrapolates the average probe rate since the scan started.
fn eta(s: &ScanRecord) -> Option<prost_types::Timestamp> {
    if s.state != ScanState::Running || s.probes_done <= 0 {
        return None;
    }
    let started = s.started_at?;
    let elapsed = (s.updated_at - started).num_milliseconds().max(1) as f64;
    let remaining = (s.probes_planned - s.probes_done).max(0) as f64;
    let ms = remaining * elapsed / s.probes_done as f64;
    Some(timestamp(s.updated_at + chrono::Duration::milliseconds(ms as i64)))
}

pub fn target_kind_to_pb(kind: &str) -> pb::TargetKind {
    match kind {
        "address" => pb::TargetKind::Address,
        "cidr" => pb::TargetKind::Cidr,
        "range" => pb::TargetKind::Range,
        "hostname" => pb::TargetKind::Hostname,
        _ => pb::TargetKind::Unspecified,
    }
}

impl From<TargetRecord> for pb::Target {
    fn from(t: TargetRecord) -> Self {
        pb::Target {
            id: t.id.to_string(),
            value: t.value,
            kind: target_kind_to_pb(&t.kind) as i32,
            group: t.group_name,
            enabled: Some(t.enabled),
            create_time: Some(timestamp(t.created_at)),
        }
    }
}

pub fn port_state_to_pb(state: PortState) -> pb::PortState {
    match state {
        PortState::Open => pb::PortState::Open,
        PortState::Closed => pb::PortState::Closed,
        PortState::Filtered => pb::PortState::Filtered,
    }
}

pub fn port_state_from_pb(value: i32) -> Result<Option<PortState>, Status> {
    Ok(match pb::PortState::try_from(value) {
        Ok(pb::PortState::Unspecified) => None,
        Ok(pb::PortState::Open) => Some(PortState::Open),
        Ok(pb::PortState::Closed) => Some(PortState::Closed),
        Ok(pb::PortState::Filtered) => Some(PortState::Filtered),
        Err(_) => return Err(Status::invalid_argument(format!("state: unknown value {value}"))),
    })
}

impl From<ResultRecord> for pb::Result {
    fn from(r: ResultRecord) -> Self {
        pb::Result {
            ip: r.ip.to_string(),
            port: r.port as u32,
            protocol: if r.protocol == "tcp" { pb::Protocol::Tcp } else { pb::Protocol::Unspecified } as i32,
            state: port_state_to_pb(r.state) as i32,
            hostname: r.hostname.unwrap_or_default(),
            observed_at: Some(timestamp(r.last_seen_at)),
            first_observed_at: Some(timestamp(r.first_seen_at)),
            service: r.service.as_ref().map(|s| pb::Service::from(&s.0)),
            host_answers_everything: r.host_answers_everything,
            cdn: portfleet_core::cdn::provider(r.ip).unwrap_or_default().into(),
        }
    }
}

pub fn agent_state_from_pb(value: i32) -> Result<Option<AgentState>, Status> {
    Ok(match pb::AgentState::try_from(value) {
        Ok(pb::AgentState::Unspecified) => None,
        Ok(pb::AgentState::Connected) => Some(AgentState::Connected),
        Ok(pb::AgentState::Draining) => Some(AgentState::Draining),
        Ok(pb::AgentState::Gone) => Some(AgentState::Gone),
        Err(_) => return Err(Status::invalid_argument(format!("state: unknown value {value}"))),
    })
}

impl From<AgentRecord> for pb::Agent {
    fn from(a: AgentRecord) -> Self {
        pb::Agent {
            id: a.id.to_string(),
            name: a.name,
            labels: a.labels.0.into_iter().collect(),
            state: match a.state {
                AgentState::Connected => pb::AgentState::Connected,
                AgentState::Draining => pb::AgentState::Draining,
                AgentState::Gone => pb::AgentState::Gone,
            } as i32,
            version: a.version,
            controller_id: a.controller_id.unwrap_or_default(),
            raw_socket: a.raw_socket,
            ipv6: a.ipv6,
            max_rate: a.max_rate as u32,
            max_shards: a.max_shards as u32,
            active_shards: a.active_shards as u32,
            current_rate: a.current_rate as u32,
            last_heartbeat_time: a.last_heartbeat_at.map(timestamp),
            connect_time: a.connected_at.map(timestamp),
        }
    }
}
