//! The agent protocol's edge on the controller: the only place that reads
//! or writes `portfleet.v1` session frames. Inbound frames become
//! validated domain values ([`Hello`], [`FromAgent`]) or a [`BadFrame`]
//! saying how to refuse them; what the controller says becomes
//! [`ToAgent`] values, turned into frames (or the ending status) only as
//! they leave. The scheduler, registry and session logic never see `pb::`.

use std::{net::IpAddr, sync::Arc};

use chrono::{DateTime, Utc};
use portfleet_core::{ScanType, labels::Labels, text};
use portfleet_proto::{
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
    v1::{self as pb, agent_message::Frame as In, controller_message::Frame as Out},
};
use portfleet_telemetry::otel::TraceParent;
use tonic::Status;
use uuid::Uuid;

use crate::{
    plans::ScanPlan,
    store::{AgentIntro, LeaseEpoch, OutOfRange, Seq, ShardId, ShardProgress},
};

/// The agent's own send time of a heartbeat, echoed back unchanged (its
/// clock, not ours: opaque here).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SentAt {
    seconds: i64,
    nanos: i32,
}

/// A validated Hello.
#[derive(Clone, Debug)]
pub struct Hello {
    pub intro: AgentIntro,
    pub labels: Labels,
    /// The protocol version both sides speak.
    pub version: u32,
    /// Leases the agent says it still holds.
    pub held: Vec<(ShardId, LeaseEpoch)>,
}

/// Which lease a frame belongs to, and where it stands in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameId {
    pub shard_id: ShardId,
    pub lease_epoch: LeaseEpoch,
    pub seq: Seq,
}

/// One open port as an agent reported it (its position in the scan is
/// found against the scan's space, which the frame does not carry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reported {
    pub ip: IpAddr,
    pub port: u16,
    pub observed_at: DateTime<Utc>,
    /// What answered, cut to the domain's bounds.
    pub service: Option<portfleet_core::Service>,
    pub host_answers_everything: bool,
}

/// A frame from an agent, validated.
#[derive(Clone, Debug, PartialEq)]
pub enum FromAgent {
    /// A second Hello, after the handshake (refused).
    Hello,
    Heartbeat {
        sent_at: Option<SentAt>,
        current_rate: u32,
        active_shards: u32,
    },
    /// Results are checked one by one but the verdict is kept apart, so
    /// the session refuses in the documented order: a lease it does not
    /// know, a batch too large, then a malformed result.
    Results {
        id: FrameId,
        results: Result<Vec<Reported>, String>,
        count: usize,
        /// The agent's shard span, which the batch's ingest span continues.
        trace_parent: Option<TraceParent>,
    },
    Progress {
        id: FrameId,
        progress: ShardProgress,
    },
    Complete {
        id: FrameId,
        progress: ShardProgress,
    },
    Failed {
        shard_id: ShardId,
        lease_epoch: LeaseEpoch,
        failure: ShardFailure,
    },
    Released {
        shard_id: ShardId,
        lease_epoch: LeaseEpoch,
        agent_leaving: bool,
    },
}

/// Why an agent gave a shard up (`ShardFailed.reason`, made safe).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShardFailure {
    /// The agent's own scope policy (`portfleet-agent run --allow/--deny`)
    /// refuses the shard's targets; what it says after its prefix. Another
    /// try would be refused the same way: the scan fails at once.
    OutOfScope(String),
    /// Anything else (an interface went away, ...): worth another try.
    Error(String),
}

/// How the agent's reason starts when its scope policy refuses a shard
/// (portfleet-agent's `Refusal::OutOfScope`, unchanged since protocol 1;
/// the cross-process test of the refusal keeps the two in step).
const AGENT_SCOPE_REFUSAL: &str = "refused by the agent's scope policy: ";

impl ShardFailure {
    fn from_reason(reason: String) -> Self {
        match reason.strip_prefix(AGENT_SCOPE_REFUSAL) {
            Some(rest) => Self::OutOfScope(rest.to_string()),
            None => Self::Error(reason),
        }
    }
}

/// Why a frame is refused, with the ids it carried as they were.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadFrame {
    pub shard_id: u64,
    pub lease_epoch: u64,
    pub seq: u64,
    pub reason: Refusal,
    pub message: String,
}

/// `Refused.reason` (docs/protocol.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    StaleEpoch,
    UnknownShard,
    BatchTooLarge,
    OutOfOrder,
    Invalid,
}

/// A lease handed to an agent.
#[derive(Clone, Debug)]
pub struct Assignment {
    pub shard_id: ShardId,
    pub lease_epoch: LeaseEpoch,
    pub plan: Arc<ScanPlan>,
    /// How this agent runs it (a SYN scan runs as connect on an agent
    /// without raw sockets, when the scan allows the fallback).
    pub scan_type: ScanType,
    /// Positions `start..end`; `start` is the shard's checkpoint.
    pub start: i64,
    pub end: i64,
    pub rate: u32,
    /// The span that sent it, for the agent's shard span to continue.
    pub trace_parent: Option<TraceParent>,
}

/// The session's parameters, sent once in Welcome.
#[derive(Clone, Debug)]
pub struct Welcome {
    pub version: u32,
    pub generation: i64,
    pub heartbeat_interval_ms: u32,
    pub max_batch_results: u32,
    pub max_unacked_frames: u32,
    pub lease_ttl_ms: u32,
    pub disconnect_grace_ms: u32,
    pub controller_id: String,
    /// Held leases the agent must drop.
    pub revoked: Vec<(ShardId, LeaseEpoch)>,
}

/// Everything the controller says to an agent.
#[derive(Clone, Debug)]
pub enum ToAgent {
    Welcome(Welcome),
    Assign(Assignment),
    Ack(FrameId),
    Cancel {
        shard_id: ShardId,
        lease_epoch: LeaseEpoch,
        reason: String,
    },
    Rate {
        shard_id: ShardId,
        lease_epoch: LeaseEpoch,
        rate: u32,
    },
    Drain,
    /// The leases were extended after the heartbeat sent at this time.
    Echo(SentAt),
    Refused(BadFrame),
    /// The last word: the session ends with this status.
    End(Status),
}

fn invalid(shard_id: u64, lease_epoch: u64, seq: u64, message: impl Into<String>) -> BadFrame {
    BadFrame { shard_id, lease_epoch, seq, reason: Refusal::Invalid, message: message.into() }
}

fn frame_id(shard_id: u64, lease_epoch: u64, seq: u64) -> Result<FrameId, BadFrame> {
    let bad = |e: OutOfRange| invalid(shard_id, lease_epoch, seq, format!("bad ids: {e}"));
    if seq == 0 {
        return Err(invalid(shard_id, lease_epoch, seq, "bad ids: seq starts at 1"));
    }
    Ok(FrameId {
        shard_id: ShardId::try_from(shard_id).map_err(bad)?,
        lease_epoch: LeaseEpoch::try_from(lease_epoch).map_err(bad)?,
        seq: Seq::try_from(seq).map_err(bad)?,
    })
}

fn lease(shard_id: u64, lease_epoch: u64) -> Result<(ShardId, LeaseEpoch), BadFrame> {
    let bad = |e: OutOfRange| invalid(shard_id, lease_epoch, 0, format!("bad ids: {e}"));
    Ok((ShardId::try_from(shard_id).map_err(bad)?, LeaseEpoch::try_from(lease_epoch).map_err(bad)?))
}

/// Counters can exceed what a bigint holds only in a broken agent: they
/// are clamped (they are reported, never trusted for fencing).
fn progress(checkpoint: u64, counts: Option<pb::ShardCounts>) -> ShardProgress {
    let c = counts.unwrap_or_default();
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    ShardProgress {
        checkpoint: clamp(checkpoint),
        sent: clamp(c.sent),
        open: clamp(c.open),
        closed: clamp(c.closed),
        filtered: clamp(c.filtered),
    }
}

fn reported(r: pb::PortResult) -> Result<Reported, String> {
    let ip = match r.ip.len() {
        4 => IpAddr::from(<[u8; 4]>::try_from(&r.ip[..]).map_err(|_| "bad ip")?),
        16 => IpAddr::from(<[u8; 16]>::try_from(&r.ip[..]).map_err(|_| "bad ip")?),
        n => return Err(format!("ip of {n} bytes (want 4 or 16)")),
    };
    let port = u16::try_from(r.port).ok().filter(|p| *p > 0).ok_or(format!("port {} outside 1-65535", r.port))?;
    if r.state != pb::PortState::Open as i32 {
        return Err("only open ports are reported".into());
    }
    let observed_at = r
        .observed_at
        .and_then(|t| DateTime::<Utc>::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)))
        .unwrap_or_else(Utc::now);
    let service = r.service.map(portfleet_core::Service::from);
    Ok(Reported { ip, port, observed_at, service, host_answers_everything: r.host_answers_everything })
}

impl TryFrom<pb::Hello> for Hello {
    type Error = Status;

    fn try_from(h: pb::Hello) -> Result<Self, Status> {
        let bad = |m: String| Status::invalid_argument(format!("hello.{m}"));
        let id = Uuid::try_parse(&h.agent_id)
            .map_err(|_| bad(format!("agent_id: {} is not a UUID", text::echo(&h.agent_id))))?;
        if h.name.is_empty() {
            return Err(bad("name: give 1 to 128 bytes".into()));
        }
        text::check(&h.name, 128).map_err(|e| bad(format!("name: {e}")))?;
        text::check(&h.version, 64).map_err(|e| bad(format!("version: {e}")))?;
        let labels = Labels::try_from(h.labels).map_err(|e| bad(format!("labels: {e}")))?;
        let (lo, hi) = (h.min_protocol_version, h.max_protocol_version);
        let version = hi.min(PROTOCOL_VERSION_MAX);
        if lo > hi || version < lo.max(PROTOCOL_VERSION_MIN) {
            return Err(Status::failed_precondition(format!(
                "protocol versions: the agent speaks {lo}..={hi}, this controller {PROTOCOL_VERSION_MIN}..={PROTOCOL_VERSION_MAX}"
            )));
        }
        if h.held.len() > 1024 {
            return Err(bad("held: more than 1024 leases".into()));
        }
        let held = h
            .held
            .iter()
            .map(|l| lease(l.shard_id, l.lease_epoch).map_err(|e| bad(format!("held: {}", e.message))))
            .collect::<Result<_, _>>()?;
        let caps = h.capabilities.unwrap_or_default();
        Ok(Self {
            intro: AgentIntro {
                id,
                name: h.name,
                version: h.version,
                labels: labels.as_map().clone(),
                raw_socket: caps.raw_socket,
                ipv6: caps.ipv6,
                max_rate: i32::try_from(h.max_rate).unwrap_or(i32::MAX),
                max_shards: i32::try_from(h.max_shards.clamp(1, 64)).unwrap_or(64),
            },
            labels,
            version,
            held,
        })
    }
}

impl TryFrom<pb::AgentMessage> for FromAgent {
    type Error = BadFrame;

    /// `Ok(None)`-like frames (no frame set) are the caller's to skip;
    /// this takes the frame itself.
    fn try_from(m: pb::AgentMessage) -> Result<Self, BadFrame> {
        let Some(f) = m.frame else { return Err(invalid(0, 0, 0, "an empty frame")) };
        Ok(match f {
            In::Hello(_) => Self::Hello,
            In::Heartbeat(h) => Self::Heartbeat {
                sent_at: h.sent_at.map(|t| SentAt { seconds: t.seconds, nanos: t.nanos }),
                current_rate: h.current_rate,
                active_shards: h.active_shards,
            },
            In::Results(b) => {
                let id = frame_id(b.shard_id, b.lease_epoch, b.seq)?;
                let count = b.results.len();
                // An invalid context is no context (W3C trace context).
                let trace_parent = b.trace_parent.as_deref().and_then(TraceParent::parse);
                Self::Results { id, results: b.results.into_iter().map(reported).collect(), count, trace_parent }
            }
            In::Progress(p) => Self::Progress {
                id: frame_id(p.shard_id, p.lease_epoch, p.seq)?,
                progress: progress(p.checkpoint, p.counts),
            },
            In::Complete(c) => {
                Self::Complete { id: frame_id(c.shard_id, c.lease_epoch, c.seq)?, progress: progress(0, c.counts) }
            }
            In::Failed(f) => {
                let (shard_id, lease_epoch) = lease(f.shard_id, f.lease_epoch)?;
                // Stored and logged: made safe for both, never refused.
                let failure = ShardFailure::from_reason(text::sanitize(&f.reason, 1000));
                Self::Failed { shard_id, lease_epoch, failure }
            }
            In::Released(r) => {
                let (shard_id, lease_epoch) = lease(r.shard_id, r.lease_epoch)?;
                Self::Released { shard_id, lease_epoch, agent_leaving: r.agent_leaving }
            }
        })
    }
}

impl From<Refusal> for pb::RefusalReason {
    fn from(r: Refusal) -> Self {
        match r {
            Refusal::StaleEpoch => Self::StaleEpoch,
            Refusal::UnknownShard => Self::UnknownShard,
            Refusal::BatchTooLarge => Self::BatchTooLarge,
            Refusal::OutOfOrder => Self::OutOfOrder,
            Refusal::Invalid => Self::Invalid,
        }
    }
}

fn held(l: &[(ShardId, LeaseEpoch)]) -> Vec<pb::HeldLease> {
    l.iter().map(|(s, e)| pb::HeldLease { shard_id: s.wire(), lease_epoch: e.wire() }).collect()
}

fn scan_type(t: ScanType) -> pb::ScanType {
    match t {
        ScanType::Syn => pb::ScanType::Syn,
        ScanType::Connect => pb::ScanType::Connect,
    }
}

impl From<Assignment> for pb::Assign {
    fn from(a: Assignment) -> Self {
        let p = &a.plan;
        pb::Assign {
            shard_id: a.shard_id.wire(),
            lease_epoch: a.lease_epoch.wire(),
            scan: Some(pb::ScanParameters {
                scan_id: p.id.to_string(),
                scan_type: scan_type(a.scan_type) as i32,
                ports: p.ports.clone(),
                address_ranges: p.address_ranges.clone(),
                retries: p.retries,
                seed: p.seed,
                total: p.probes_planned,
                identify: p.identify,
                hostnames: p
                    .hostnames
                    .iter()
                    .flat_map(|(ip, names)| {
                        let ip = match ip {
                            IpAddr::V4(v4) => v4.octets().to_vec(),
                            IpAddr::V6(v6) => v6.octets().to_vec(),
                        };
                        names.split(',').map(move |name| pb::HostName { ip: ip.clone(), name: name.to_string() })
                    })
                    .collect(),
                port_threshold: p.port_threshold,
                limited_ranges: p.space.limited().map(|l| l.addrs.to_strings()).unwrap_or_default(),
                limited_ports: p.space.limited().map(|l| l.ports.to_string()).unwrap_or_default(),
            }),
            start_index: u64::try_from(a.start).unwrap_or(0),
            end_index: u64::try_from(a.end).unwrap_or(0),
            rate: a.rate,
            trace_parent: a.trace_parent.map(TraceParent::into_string),
        }
    }
}

impl ToAgent {
    /// The frame this becomes, or the status that ends the stream.
    pub fn into_wire(self) -> Result<pb::ControllerMessage, Status> {
        let frame = match self {
            Self::Welcome(w) => Out::Welcome(pb::Welcome {
                protocol_version: w.version,
                session_generation: u64::try_from(w.generation).unwrap_or(0),
                heartbeat_interval_ms: w.heartbeat_interval_ms,
                limits: Some(pb::Limits {
                    max_batch_results: w.max_batch_results,
                    max_unacked_frames: w.max_unacked_frames,
                    lease_ttl_ms: w.lease_ttl_ms,
                    disconnect_grace_ms: w.disconnect_grace_ms,
                }),
                controller_id: w.controller_id,
                revoked: held(&w.revoked),
            }),
            Self::Assign(a) => Out::Assign(a.into()),
            Self::Ack(id) => Out::Ack(pb::Ack {
                shard_id: id.shard_id.wire(),
                lease_epoch: id.lease_epoch.wire(),
                seq: id.seq.wire(),
            }),
            Self::Cancel { shard_id, lease_epoch, reason } => {
                Out::Cancel(pb::Cancel { shard_id: shard_id.wire(), lease_epoch: lease_epoch.wire(), reason })
            }
            Self::Rate { shard_id, lease_epoch, rate } => {
                Out::Rate(pb::RateUpdate { shard_id: shard_id.wire(), lease_epoch: lease_epoch.wire(), rate })
            }
            Self::Drain => Out::Drain(pb::Drain {}),
            Self::Echo(at) => Out::Heartbeat(pb::Heartbeat {
                sent_at: Some(prost_types::Timestamp { seconds: at.seconds, nanos: at.nanos }),
                ..Default::default()
            }),
            Self::Refused(b) => Out::Refused(pb::Refused {
                shard_id: b.shard_id,
                lease_epoch: b.lease_epoch,
                seq: b.seq,
                reason: pb::RefusalReason::from(b.reason) as i32,
                message: b.message,
            }),
            Self::End(status) => return Err(status),
        };
        Ok(pb::ControllerMessage { frame: Some(frame) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> pb::Hello {
        pb::Hello {
            agent_id: Uuid::nil().to_string(),
            name: "a".into(),
            version: "1".into(),
            min_protocol_version: PROTOCOL_VERSION_MIN,
            max_protocol_version: PROTOCOL_VERSION_MAX,
            max_shards: 2,
            ..Default::default()
        }
    }

    fn msg(f: In) -> pb::AgentMessage {
        pb::AgentMessage { frame: Some(f) }
    }

    fn result(ip: Vec<u8>, port: u32) -> pb::PortResult {
        pb::PortResult { ip, port, state: pb::PortState::Open as i32, observed_at: None, ..Default::default() }
    }

    #[test]
    fn hellos_are_validated_with_the_documented_codes() {
        assert!(Hello::try_from(hello()).is_ok());
        let code = |f: &dyn Fn(&mut pb::Hello)| {
            let mut h = hello();
            f(&mut h);
            Hello::try_from(h).unwrap_err().code()
        };
        assert_eq!(code(&|h| h.agent_id = "nope".into()), tonic::Code::InvalidArgument);
        assert_eq!(code(&|h| h.name = String::new()), tonic::Code::InvalidArgument);
        assert_eq!(code(&|h| h.name = "a\nb".into()), tonic::Code::InvalidArgument);
        assert_eq!(code(&|h| h.labels = [("bad key".into(), "v".into())].into()), tonic::Code::InvalidArgument);
        assert_eq!(code(&|h| h.min_protocol_version = 99), tonic::Code::FailedPrecondition);
        let past = pb::HeldLease { shard_id: u64::MAX, lease_epoch: 1 };
        assert_eq!(code(&|h| h.held = vec![past]), tonic::Code::InvalidArgument);
        let h = Hello::try_from(pb::Hello { max_shards: 1000, max_rate: u32::MAX, ..hello() }).unwrap();
        assert_eq!((h.intro.max_shards, h.intro.max_rate), (64, i32::MAX));
    }

    /// An agent's identification is taken cut to the domain's bounds and
    /// without control characters, whatever the agent sent.
    #[test]
    fn reported_services_are_bounded() {
        let service = pb::Service {
            name: "ssh\u{1b}[2J".into(),
            banner: "b".repeat(1 << 20),
            confidence: 1000,
            ..Default::default()
        };
        let r = reported(pb::PortResult {
            service: Some(service),
            host_answers_everything: true,
            ..result(vec![192, 0, 2, 1], 22)
        })
        .unwrap();
        let s = r.service.unwrap();
        assert_eq!((s.name.as_str(), s.confidence), ("ssh[2J", 10));
        assert_eq!(s.banner.len(), portfleet_core::service::MAX_BANNER);
        assert!(r.host_answers_everything);
        assert_eq!(reported(result(vec![192, 0, 2, 1], 22)).unwrap().service, None);
    }

    #[test]
    fn frames_with_ids_past_the_database_are_invalid_not_wrapped() {
        let batch = |shard: u64, seq: u64| {
            let b = pb::ResultBatch { shard_id: shard, lease_epoch: 1, seq, results: vec![], trace_parent: None };
            msg(In::Results(b))
        };
        let bad = FromAgent::try_from(batch(u64::MAX, 1)).unwrap_err();
        assert_eq!((bad.reason, bad.shard_id), (Refusal::Invalid, u64::MAX));
        assert_eq!(FromAgent::try_from(batch(1, 0)).unwrap_err().reason, Refusal::Invalid);
        let failed = msg(In::Failed(pb::ShardFailed { shard_id: 1 << 63, lease_epoch: 1, reason: "x".into() }));
        assert_eq!(FromAgent::try_from(failed).unwrap_err().reason, Refusal::Invalid);
        let released =
            msg(In::Released(pb::ShardReleased { shard_id: 3, lease_epoch: u64::MAX, agent_leaving: false }));
        assert_eq!(FromAgent::try_from(released).unwrap_err().reason, Refusal::Invalid);
    }

    #[test]
    fn results_are_checked_but_the_verdict_waits() {
        let m = msg(In::Results(pb::ResultBatch {
            shard_id: 1,
            lease_epoch: 2,
            seq: 3,
            results: vec![result(vec![198, 51, 100, 1], 80), result(vec![1, 2, 3, 4, 5], 80)],
            trace_parent: Some(TRACE.into()),
        }));
        let FromAgent::Results { id, results, count, trace_parent } = FromAgent::try_from(m).unwrap() else { panic!() };
        assert_eq!((id.shard_id, id.lease_epoch, id.seq, count), (ShardId(1), LeaseEpoch(2), Seq(3), 2));
        assert_eq!(trace_parent.as_ref().map(TraceParent::as_str), Some(TRACE));
        assert_eq!(results.unwrap_err(), "ip of 5 bytes (want 4 or 16)");
        assert!(reported(result(vec![1, 2, 3, 4], 70000)).unwrap_err().contains("outside 1-65535"));
        assert!(reported(result(vec![1, 2, 3, 4], 0)).is_err());
        let closed = pb::PortResult { state: pb::PortState::Closed as i32, ..result(vec![1, 2, 3, 4], 1) };
        assert!(reported(closed).is_err());
    }

    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// Trace context is optional both ways (older peers send none) and an
    /// invalid one is dropped, never refused.
    #[test]
    fn trace_context_is_optional_and_checked() {
        let batch = |trace_parent: Option<&str>| {
            let b = pb::ResultBatch { shard_id: 1, lease_epoch: 1, seq: 1, results: vec![], trace_parent: None };
            msg(In::Results(pb::ResultBatch { trace_parent: trace_parent.map(Into::into), ..b }))
        };
        for (sent, kept) in [(None, None), (Some("00-garbage"), None), (Some(TRACE), Some(TRACE))] {
            let FromAgent::Results { trace_parent, .. } = FromAgent::try_from(batch(sent)).unwrap() else { panic!() };
            assert_eq!(trace_parent.as_ref().map(TraceParent::as_str), kept, "{sent:?}");
        }
    }

    #[test]
    fn failure_reasons_are_made_safe_and_counters_clamped() {
        let m = msg(In::Failed(pb::ShardFailed { shard_id: 1, lease_epoch: 1, reason: "a\0b\nc".into() }));
        assert!(matches!(FromAgent::try_from(m).unwrap(),
            FromAgent::Failed { failure: ShardFailure::Error(reason), .. } if reason == "a b c"));
        let reason = "refused by the agent's scope policy: 192.0.2.1 is outside its --allow/--deny";
        let m = msg(In::Failed(pb::ShardFailed { shard_id: 1, lease_epoch: 1, reason: reason.into() }));
        assert!(matches!(FromAgent::try_from(m).unwrap(),
            FromAgent::Failed { failure: ShardFailure::OutOfScope(why), .. }
                if why == "192.0.2.1 is outside its --allow/--deny"));
        let p = progress(u64::MAX, Some(pb::ShardCounts { sent: u64::MAX, ..Default::default() }));
        assert_eq!((p.checkpoint, p.sent), (i64::MAX, i64::MAX));
    }

    #[test]
    fn what_the_controller_says_becomes_frames_or_the_end() {
        let ack = ToAgent::Ack(FrameId { shard_id: ShardId(5), lease_epoch: LeaseEpoch(6), seq: Seq(7) });
        let Some(Out::Ack(a)) = ack.into_wire().unwrap().frame else { panic!() };
        assert_eq!((a.shard_id, a.lease_epoch, a.seq), (5, 6, 7));
        let end = ToAgent::End(Status::aborted("superseded")).into_wire().unwrap_err();
        assert_eq!(end.code(), tonic::Code::Aborted);
        let echo = ToAgent::Echo(SentAt { seconds: 3, nanos: 4 }).into_wire().unwrap();
        let Some(Out::Heartbeat(h)) = echo.frame else { panic!() };
        assert_eq!(h.sent_at, Some(prost_types::Timestamp { seconds: 3, nanos: 4 }));
    }
}
