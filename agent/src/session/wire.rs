//! The agent's edge of the session protocol (`portfleet.v1.AgentService`,
//! docs/protocol.md): the only module of the agent that touches the
//! generated `portfleet_proto::v1` session frames.
//!
//! Inbound frames are converted with `TryFrom` into validated domain values
//! (an [`Assignment`] is a rebuilt [`ScanSpace`] with its range checked, not
//! a bag of strings), and the frames the agent sends are built `From` domain
//! values ([`Hello`], [`Heartbeat`], [`ShardFrame`]). Shard ids, lease epochs
//! and sequence numbers are checked newtypes: the controller keeps them in
//! `bigint` columns, so a value of 0 or past `i64::MAX` names nothing it can
//! hold. The stream itself is opened here too ([`open`]), so the rest of the
//! session speaks domain values only.

use std::{
    collections::HashMap,
    fmt,
    net::IpAddr,
    sync::Arc,
    time::{Duration, SystemTime},
};

use portfleet_core::{
    AddressSet, PortSet, ScanSpace, ScanType, ShardRange, SpecError, labels::Labels, permutation::Permutation, text,
};
use portfleet_proto::{
    PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN,
    v1::{
        self as pb, agent_message::Frame as Out, agent_service_client::AgentServiceClient,
        controller_message::Frame as In,
    },
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use uuid::Uuid;

use portfleet_telemetry::otel::TraceParent;

use crate::{engine::Counts, identify::Identified};

/// The largest id, epoch or sequence number the controller can store.
const MAX_WIRE_ID: u64 = i64::MAX.unsigned_abs();

/// Longest peer-reported text (ids, reasons, messages) kept for logs.
const MAX_PEER_TEXT: usize = 1024;

/// A shard id, epoch or sequence number that names nothing the controller
/// can hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value} is out of range (1..={MAX_WIRE_ID})")]
pub struct IdError {
    pub what: &'static str,
    pub value: u64,
}

macro_rules! wire_number {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u64);

        impl $name {
            pub fn get(self) -> u64 {
                self.0
            }
        }

        impl TryFrom<u64> for $name {
            type Error = IdError;

            fn try_from(value: u64) -> Result<Self, IdError> {
                if (1..=MAX_WIRE_ID).contains(&value) {
                    Ok(Self(value))
                } else {
                    Err(IdError { what: $what, value })
                }
            }
        }

        impl From<$name> for u64 {
            fn from(v: $name) -> u64 {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

wire_number!(
    /// A shard of a scan, as the controller numbers them.
    ShardId,
    "shard_id"
);
wire_number!(
    /// Which lease of a shard: goes up with every lease, so frames of an
    /// older lease are fenced off.
    LeaseEpoch,
    "lease_epoch"
);
wire_number!(
    /// A lease's frame number: starts at 1 and counts result batches,
    /// progress and completion together.
    Seq,
    "seq"
);

impl Seq {
    pub const FIRST: Seq = Seq(1);

    /// The number after this one. Saturates at the largest number the
    /// controller stores, which no lease comes near (2^63 frames).
    pub fn next(self) -> Seq {
        Seq(self.0.saturating_add(1).min(MAX_WIRE_ID))
    }
}

/// One lease: a shard at an epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId {
    pub shard: ShardId,
    pub epoch: LeaseEpoch,
}

impl LeaseId {
    fn from_wire(shard_id: u64, lease_epoch: u64) -> Result<Self, IdError> {
        Ok(Self { shard: ShardId::try_from(shard_id)?, epoch: LeaseEpoch::try_from(lease_epoch)? })
    }
}

impl TryFrom<&pb::HeldLease> for LeaseId {
    type Error = IdError;

    fn try_from(l: &pb::HeldLease) -> Result<Self, IdError> {
        Self::from_wire(l.shard_id, l.lease_epoch)
    }
}

impl From<LeaseId> for pb::HeldLease {
    fn from(l: LeaseId) -> Self {
        pb::HeldLease { shard_id: l.shard.get(), lease_epoch: l.epoch.get() }
    }
}

// ---------------------------------------------------------------------------
// Controller -> agent
// ---------------------------------------------------------------------------

/// A validated lease: the scan's index space rebuilt from the Assign (the
/// same core code as the controller's planner), its size checked against
/// the controller's, and the leased range checked against it.
#[derive(Clone, Debug)]
pub struct Assignment {
    pub lease: LeaseId,
    /// For logs (sanitized).
    pub scan_id: String,
    pub space: Arc<ScanSpace>,
    pub scan_type: ScanType,
    /// Positions to probe; `start` is the shard's checkpoint.
    pub range: ShardRange,
    pub retries: u32,
    /// This lease's share of the scan's rate, probes per second, before the
    /// agent's own ceiling.
    pub rate: u32,
    /// Identify open ports before reporting them.
    pub identify: bool,
    /// Names per address (SNI, HTTP Host for identification).
    pub names: Arc<HashMap<IpAddr, Vec<String>>>,
    /// Open ports on one address above which it answers everything; 0 for
    /// no limit.
    pub port_threshold: u32,
    /// The controller's span that sent the Assign: the shard span's parent.
    pub trace_parent: Option<TraceParent>,
}

/// Why an Assign's work is unusable. The messages are what the agent
/// reports to the controller in `ShardFailed.reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAssign {
    #[error("assign without scan parameters")]
    NoScan,
    #[error("address ranges: {0}")]
    Addresses(SpecError),
    #[error("ports: {0}")]
    Ports(SpecError),
    #[error("{0}")]
    Space(SpecError),
    #[error("index space of {built} positions, the controller planned {planned}")]
    Size { built: u64, planned: u64 },
    #[error("range {start}..{end} outside the scan's {len} positions")]
    Range { start: u64, end: u64, len: u64 },
    #[error("unknown scan type {0}")]
    ScanType(i32),
}

/// An Assign naming a well-formed lease whose work is unusable: the agent
/// fails that lease (`ShardFailed`) with `reason`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct RejectedAssign {
    pub lease: LeaseId,
    pub reason: InvalidAssign,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssignError {
    /// No lease the controller can hold: nothing to report it against.
    #[error("assign: {0}")]
    Ids(#[from] IdError),
    #[error(transparent)]
    Rejected(#[from] RejectedAssign),
}

impl TryFrom<pb::Assign> for Assignment {
    type Error = AssignError;

    fn try_from(a: pb::Assign) -> Result<Self, AssignError> {
        let lease = LeaseId::from_wire(a.shard_id, a.lease_epoch)?;
        let reject = |reason| RejectedAssign { lease, reason };
        let p = a.scan.ok_or_else(|| reject(InvalidAssign::NoScan))?;
        let addrs = AddressSet::parse_ranges(&p.address_ranges).map_err(|e| reject(InvalidAssign::Addresses(e)))?;
        let ports = PortSet::parse(&p.ports).map_err(|e| reject(InvalidAssign::Ports(e)))?;
        let mut space =
            ScanSpace::new(addrs, ports, p.seed, Permutation::MAX_LEN).map_err(|e| reject(InvalidAssign::Space(e)))?;
        if !p.limited_ranges.is_empty() {
            let addrs = AddressSet::parse_ranges(&p.limited_ranges).map_err(|e| reject(InvalidAssign::Addresses(e)))?;
            let ports = PortSet::parse(&p.limited_ports).map_err(|e| reject(InvalidAssign::Ports(e)))?;
            space = space.with_limited(portfleet_core::space::Limited { addrs, ports });
        }
        if space.len() != p.total {
            return Err(reject(InvalidAssign::Size { built: space.len(), planned: p.total }).into());
        }
        if a.start_index > a.end_index || a.end_index > space.len() {
            let len = space.len();
            return Err(reject(InvalidAssign::Range { start: a.start_index, end: a.end_index, len }).into());
        }
        let scan_type = match pb::ScanType::try_from(p.scan_type) {
            Ok(pb::ScanType::Connect) => ScanType::Connect,
            Ok(pb::ScanType::Syn) => ScanType::Syn,
            _ => return Err(reject(InvalidAssign::ScanType(p.scan_type)).into()),
        };
        let mut names: HashMap<IpAddr, Vec<String>> = HashMap::new();
        for h in p.hostnames.iter().take(MAX_HOSTNAMES) {
            let ip = match h.ip.len() {
                4 => <[u8; 4]>::try_from(&h.ip[..]).map(IpAddr::from),
                16 => <[u8; 16]>::try_from(&h.ip[..]).map(IpAddr::from),
                _ => continue,
            };
            // A name that is not a plain DNS name is never sent as SNI or
            // Host: it is dropped, not escaped.
            if let (Ok(ip), true) = (ip, is_dns_name(&h.name)) {
                names.entry(ip).or_default().push(h.name.clone());
            }
        }
        Ok(Assignment {
            lease,
            scan_id: text::sanitize(&p.scan_id, 64),
            space: Arc::new(space),
            scan_type,
            range: ShardRange { start: a.start_index, end: a.end_index },
            retries: p.retries,
            rate: a.rate,
            identify: p.identify,
            names: Arc::new(names),
            port_threshold: p.port_threshold,
            // An invalid context is no context (W3C trace context), never a
            // reason to refuse the work.
            trace_parent: a.trace_parent.as_deref().and_then(TraceParent::parse),
        })
    }
}

/// Hostnames per Assign the agent keeps (the controller sends at most its
/// per-scan limit).
const MAX_HOSTNAMES: usize = 10_000;

/// Letters, digits, '-', '_' and '.', 1 to 253 bytes: safe in a Host
/// header and as SNI.
fn is_dns_name(name: &str) -> bool {
    (1..=253).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// What the controller's Welcome sets for a session, clamped to what this
/// agent works with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub protocol_version: u32,
    pub generation: u64,
    /// For logs (sanitized).
    pub controller_id: String,
    /// How often to send a heartbeat (100 ms to 60 s).
    pub heartbeat: Duration,
    pub limits: Limits,
    /// A lease lapses no sooner than this after the controller last
    /// extended it: `min(lease TTL, disconnect grace)` of those announced.
    pub lapse: Option<Duration>,
    /// The controller echoes heartbeats (it announces a disconnect grace);
    /// older ones do not.
    pub echoes: bool,
    /// Held leases that lapsed meanwhile: drop them.
    pub revoked: Vec<LeaseId>,
}

/// Per-lease limits from the Welcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most results in one batch (1 to 100 000).
    pub max_batch: usize,
    /// Frames of one lease kept unacked (2 to 10 000).
    pub max_unacked: usize,
}

impl Default for Limits {
    /// Until a controller says otherwise.
    fn default() -> Self {
        Self { max_batch: 1000, max_unacked: 64 }
    }
}

fn clamped(v: u32, lo: usize, hi: usize) -> usize {
    usize::try_from(v).unwrap_or(usize::MAX).clamp(lo, hi)
}

impl From<pb::Welcome> for Welcome {
    fn from(w: pb::Welcome) -> Self {
        let limits = w.limits.unwrap_or_default();
        let lapse = [limits.lease_ttl_ms, limits.disconnect_grace_ms].into_iter().filter(|&ms| ms > 0).min();
        Welcome {
            protocol_version: w.protocol_version,
            generation: w.session_generation,
            controller_id: text::sanitize(&w.controller_id, 128),
            heartbeat: Duration::from_millis(u64::from(w.heartbeat_interval_ms).clamp(100, 60_000)),
            limits: Limits {
                max_batch: clamped(limits.max_batch_results, 1, 100_000),
                max_unacked: clamped(limits.max_unacked_frames, 2, 10_000),
            },
            lapse: lapse.map(|ms| Duration::from_millis(u64::from(ms))),
            echoes: limits.disconnect_grace_ms > 0,
            // A malformed entry names no lease this agent holds.
            revoked: w.revoked.iter().filter_map(|l| LeaseId::try_from(l).ok()).collect(),
        }
    }
}

/// Every frame of `lease` up to `seq` is committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ack {
    pub lease: LeaseId,
    pub seq: Seq,
}

impl TryFrom<pb::Ack> for Ack {
    type Error = IdError;

    fn try_from(a: pb::Ack) -> Result<Self, IdError> {
        Ok(Self { lease: LeaseId::from_wire(a.shard_id, a.lease_epoch)?, seq: Seq::try_from(a.seq)? })
    }
}

/// Stop `lease` now and forget it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cancel {
    pub lease: LeaseId,
    /// For logs (sanitized).
    pub reason: String,
}

impl TryFrom<pb::Cancel> for Cancel {
    type Error = IdError;

    fn try_from(c: pb::Cancel) -> Result<Self, IdError> {
        Ok(Self {
            lease: LeaseId::from_wire(c.shard_id, c.lease_epoch)?,
            reason: text::sanitize(&c.reason, MAX_PEER_TEXT),
        })
    }
}

/// The lease's new share of its scan's rate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateUpdate {
    pub lease: LeaseId,
    pub rate: u32,
}

impl TryFrom<pb::RateUpdate> for RateUpdate {
    type Error = IdError;

    fn try_from(r: pb::RateUpdate) -> Result<Self, IdError> {
        Ok(Self { lease: LeaseId::from_wire(r.shard_id, r.lease_epoch)?, rate: r.rate })
    }
}

/// Why the controller did not apply a frame (docs/protocol.md, Refusals).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    StaleEpoch,
    UnknownShard,
    BatchTooLarge,
    OutOfOrder,
    Invalid,
    /// A reason this build does not know.
    Other(i32),
}

impl RefusalReason {
    /// The lease is gone on the controller's side: stop it, drop its frames.
    pub fn lease_gone(self) -> bool {
        matches!(self, Self::StaleEpoch | Self::UnknownShard)
    }
}

/// The protocol's names (docs/protocol.md, Refusals), for logs.
impl fmt::Display for RefusalReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::StaleEpoch => f.write_str("STALE_EPOCH"),
            Self::UnknownShard => f.write_str("UNKNOWN_SHARD"),
            Self::BatchTooLarge => f.write_str("BATCH_TOO_LARGE"),
            Self::OutOfOrder => f.write_str("OUT_OF_ORDER"),
            Self::Invalid => f.write_str("INVALID"),
            Self::Other(v) => write!(f, "reason {v}"),
        }
    }
}

impl From<i32> for RefusalReason {
    fn from(v: i32) -> Self {
        match pb::RefusalReason::try_from(v) {
            Ok(pb::RefusalReason::StaleEpoch) => Self::StaleEpoch,
            Ok(pb::RefusalReason::UnknownShard) => Self::UnknownShard,
            Ok(pb::RefusalReason::BatchTooLarge) => Self::BatchTooLarge,
            Ok(pb::RefusalReason::OutOfOrder) => Self::OutOfOrder,
            Ok(pb::RefusalReason::Invalid) => Self::Invalid,
            Ok(pb::RefusalReason::Unspecified) | Err(_) => Self::Other(v),
        }
    }
}

/// A frame the controller did not apply; the session goes on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// `None` when the refused frame was not about a lease (a second Hello).
    pub lease: Option<LeaseId>,
    pub seq: Option<Seq>,
    pub reason: RefusalReason,
    /// For logs (sanitized).
    pub message: String,
}

impl From<pb::Refused> for Refused {
    fn from(r: pb::Refused) -> Self {
        Self {
            lease: LeaseId::from_wire(r.shard_id, r.lease_epoch).ok(),
            seq: Seq::try_from(r.seq).ok(),
            reason: RefusalReason::from(r.reason),
            message: text::sanitize(&r.message, MAX_PEER_TEXT),
        }
    }
}

/// A controller frame, validated.
#[derive(Debug)]
pub enum Inbound {
    Welcome(Welcome),
    /// A lease: its work, or why that work is unusable.
    Assign(Box<Result<Assignment, RejectedAssign>>),
    Ack(Ack),
    Cancel(Cancel),
    Rate(RateUpdate),
    Drain,
    Refused(Refused),
    /// The controller extended this agent's leases after the heartbeat it
    /// sent at `sent_at` (`None`: a time that is no timestamp).
    HeartbeatEcho {
        sent_at: Option<SystemTime>,
    },
}

/// A controller frame that names nothing this agent can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("a frame without content")]
    Empty,
    #[error("{frame}: {source}")]
    Ids { frame: &'static str, source: IdError },
}

impl TryFrom<pb::ControllerMessage> for Inbound {
    type Error = FrameError;

    fn try_from(msg: pb::ControllerMessage) -> Result<Self, FrameError> {
        let ids = |frame| move |source| FrameError::Ids { frame, source };
        Ok(match msg.frame.ok_or(FrameError::Empty)? {
            In::Welcome(w) => Inbound::Welcome(w.into()),
            In::Assign(a) => match Assignment::try_from(a) {
                Ok(a) => Inbound::Assign(Box::new(Ok(a))),
                Err(AssignError::Rejected(r)) => Inbound::Assign(Box::new(Err(r))),
                Err(AssignError::Ids(e)) => return Err(ids("Assign")(e)),
            },
            In::Ack(a) => Inbound::Ack(a.try_into().map_err(ids("Ack"))?),
            In::Cancel(c) => Inbound::Cancel(c.try_into().map_err(ids("Cancel"))?),
            In::Rate(r) => Inbound::Rate(r.try_into().map_err(ids("RateUpdate"))?),
            In::Drain(_) => Inbound::Drain,
            In::Refused(r) => Inbound::Refused(r.into()),
            In::Heartbeat(h) => Inbound::HeartbeatEcho { sent_at: h.sent_at.as_ref().and_then(system_time) },
        })
    }
}

// ---------------------------------------------------------------------------
// Agent -> controller
// ---------------------------------------------------------------------------

/// What this agent can do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities {
    pub raw_socket: bool,
    pub ipv6: bool,
}

/// The first frame of every session.
#[derive(Clone, Debug)]
pub struct Hello {
    pub agent_id: Uuid,
    pub name: String,
    pub version: String,
    pub capabilities: Capabilities,
    pub labels: Labels,
    /// Probes per second over all shards; 0 for no limit.
    pub max_rate: u32,
    pub max_shards: u32,
    /// Leases still in hand, to resume.
    pub held: Vec<LeaseId>,
}

impl From<Hello> for pb::Hello {
    fn from(h: Hello) -> Self {
        pb::Hello {
            agent_id: h.agent_id.to_string(),
            name: h.name,
            version: h.version,
            min_protocol_version: PROTOCOL_VERSION_MIN,
            max_protocol_version: PROTOCOL_VERSION_MAX,
            capabilities: Some(pb::Capabilities { raw_socket: h.capabilities.raw_socket, ipv6: h.capabilities.ipv6 }),
            labels: h.labels.into_map().into_iter().collect(),
            max_rate: h.max_rate,
            max_shards: h.max_shards,
            held: h.held.into_iter().map(pb::HeldLease::from).collect(),
        }
    }
}

/// Keeps the session and its leases alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// On the agent's own clock; the controller echoes it back unchanged.
    pub sent_at: SystemTime,
    /// Probes per second over the last interval.
    pub current_rate: u32,
    pub active_shards: u32,
}

impl From<Heartbeat> for pb::Heartbeat {
    fn from(h: Heartbeat) -> Self {
        pb::Heartbeat {
            sent_at: Some(timestamp(h.sent_at)),
            current_rate: h.current_rate,
            active_shards: h.active_shards,
        }
    }
}

/// A frame about one lease. Sequenced frames (results, progress,
/// completion) are acked; failure and hand-back are not.
#[derive(Clone, Debug, PartialEq)]
pub enum ShardFrame {
    Results {
        lease: LeaseId,
        seq: Seq,
        results: Vec<Identified>,
        /// The shard's span, for the controller's ingest span to continue.
        trace_parent: Option<TraceParent>,
    },
    /// Every position below `checkpoint` is final and its results are in
    /// earlier frames.
    Progress {
        lease: LeaseId,
        seq: Seq,
        checkpoint: u64,
        counts: Counts,
    },
    Complete {
        lease: LeaseId,
        seq: Seq,
        counts: Counts,
    },
    Failed {
        lease: LeaseId,
        reason: String,
    },
    Released {
        lease: LeaseId,
        agent_leaving: bool,
    },
}

impl ShardFrame {
    pub fn seq(&self) -> Option<Seq> {
        match self {
            Self::Results { seq, .. } | Self::Progress { seq, .. } | Self::Complete { seq, .. } => Some(*seq),
            Self::Failed { .. } | Self::Released { .. } => None,
        }
    }
}

fn counts(c: &Counts) -> pb::ShardCounts {
    pb::ShardCounts { sent: c.sent, open: c.open, closed: c.closed, filtered: c.filtered }
}

fn port_result(r: &Identified) -> pb::PortResult {
    let f = &r.finding;
    let ip = match f.ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    };
    pb::PortResult {
        ip,
        port: u32::from(f.port),
        state: pb::PortState::Open.into(),
        observed_at: Some(timestamp(f.observed_at)),
        service: r.service.as_ref().map(pb::Service::from),
        host_answers_everything: r.answers_everything,
    }
}

impl From<ShardFrame> for Out {
    fn from(f: ShardFrame) -> Self {
        match f {
            ShardFrame::Results { lease, seq, results, trace_parent } => Out::Results(pb::ResultBatch {
                shard_id: lease.shard.get(),
                lease_epoch: lease.epoch.get(),
                seq: seq.get(),
                results: results.iter().map(port_result).collect(),
                trace_parent: trace_parent.map(TraceParent::into_string),
            }),
            ShardFrame::Progress { lease, seq, checkpoint, counts: c } => Out::Progress(pb::Progress {
                shard_id: lease.shard.get(),
                lease_epoch: lease.epoch.get(),
                seq: seq.get(),
                checkpoint,
                counts: Some(counts(&c)),
            }),
            ShardFrame::Complete { lease, seq, counts: c } => Out::Complete(pb::ShardComplete {
                shard_id: lease.shard.get(),
                lease_epoch: lease.epoch.get(),
                seq: seq.get(),
                counts: Some(counts(&c)),
            }),
            ShardFrame::Failed { lease, reason } => {
                Out::Failed(pb::ShardFailed { shard_id: lease.shard.get(), lease_epoch: lease.epoch.get(), reason })
            }
            ShardFrame::Released { lease, agent_leaving } => Out::Released(pb::ShardReleased {
                shard_id: lease.shard.get(),
                lease_epoch: lease.epoch.get(),
                agent_leaving,
            }),
        }
    }
}

/// A frame for the controller.
#[derive(Clone, Debug)]
pub enum Outbound {
    Hello(Hello),
    Heartbeat(Heartbeat),
    Shard(ShardFrame),
}

impl From<Outbound> for pb::AgentMessage {
    fn from(o: Outbound) -> Self {
        let frame = match o {
            Outbound::Hello(h) => Out::Hello(h.into()),
            Outbound::Heartbeat(h) => Out::Heartbeat(h.into()),
            Outbound::Shard(f) => f.into(),
        };
        pb::AgentMessage { frame: Some(frame) }
    }
}

// ---------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------

/// `t` as a protobuf timestamp (times before 1970 as 1970).
fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    prost_types::Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Below 10^9: always fits.
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

/// The time a protobuf timestamp names; `None` for negative or
/// out-of-range fields (the controller only echoes our own stamps).
fn system_time(ts: &prost_types::Timestamp) -> Option<SystemTime> {
    let seconds = u64::try_from(ts.seconds).ok()?;
    let nanos = u32::try_from(ts.nanos).ok().filter(|&n| n < 1_000_000_000)?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(seconds, nanos))
}

// ---------------------------------------------------------------------------
// The stream
// ---------------------------------------------------------------------------

/// Frames queued for the stream to the controller (bounded: a stalled
/// stream makes senders wait).
const OUTBOUND_FRAMES: usize = 64;

/// The agent's half of a session stream.
pub struct FrameSink(mpsc::Sender<pb::AgentMessage>);

/// The stream to the controller is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the stream to the controller is closed")]
pub struct StreamClosed;

impl FrameSink {
    pub async fn send(&self, frame: Outbound) -> Result<(), StreamClosed> {
        self.0.send(frame.into()).await.map_err(|_| StreamClosed)
    }
}

/// The controller's half of a session stream.
pub struct FrameSource(tonic::Streaming<pb::ControllerMessage>);

impl FrameSource {
    /// The next frame, converted; `Ok(None)` when the controller closed the
    /// stream, `Err` when it ended with a status.
    pub async fn next(&mut self) -> Result<Option<Result<Inbound, FrameError>>, tonic::Status> {
        Ok(self.0.message().await?.map(Inbound::try_from))
    }
}

/// Opens `AgentService.Session` on `channel`, `hello` first.
pub async fn open(channel: Channel, hello: Hello) -> Result<(FrameSink, FrameSource), tonic::Status> {
    let (tx, rx) = mpsc::channel(OUTBOUND_FRAMES);
    let sink = FrameSink(tx);
    // The receiver is alive and the channel empty: this cannot fail.
    sink.send(Outbound::Hello(hello)).await.map_err(|e| tonic::Status::cancelled(e.to_string()))?;
    let inbound = AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await?.into_inner();
    Ok((sink, FrameSource(inbound)))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn scan() -> pb::ScanParameters {
        pb::ScanParameters {
            scan_id: "s-1".into(),
            scan_type: pb::ScanType::Connect.into(),
            ports: "80,443".into(),
            address_ranges: vec!["192.0.2.0-192.0.2.4".into()],
            retries: 2,
            seed: 7,
            total: 10,
            ..Default::default()
        }
    }

    fn assign() -> pb::Assign {
        pb::Assign {
            shard_id: 3,
            lease_epoch: 2,
            scan: Some(scan()),
            start_index: 4,
            end_index: 10,
            rate: 500,
            trace_parent: None,
        }
    }

    fn rejected(a: pb::Assign) -> String {
        match Assignment::try_from(a) {
            Err(AssignError::Rejected(r)) => {
                assert_eq!(r.lease, LeaseId { shard: ShardId(3), epoch: LeaseEpoch(2) });
                r.to_string()
            }
            other => panic!("expected a rejected assign, got {other:?}"),
        }
    }

    #[test]
    fn a_good_assign_becomes_an_assignment() {
        let a = Assignment::try_from(assign()).unwrap();
        assert_eq!(a.lease, LeaseId { shard: ShardId(3), epoch: LeaseEpoch(2) });
        assert_eq!(
            (a.scan_type, a.range, a.retries, a.rate),
            (ScanType::Connect, ShardRange { start: 4, end: 10 }, 2, 500)
        );
        assert_eq!(a.space.len(), 10);
        assert_eq!(a.scan_id, "s-1");
        let mut syn = assign();
        syn.scan.as_mut().unwrap().scan_type = pb::ScanType::Syn.into();
        assert_eq!(Assignment::try_from(syn).unwrap().scan_type, ScanType::Syn);
        // Trace context: optional, and an invalid one is dropped, the work kept.
        assert_eq!(a.trace_parent, None);
        let traced = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let a = Assignment::try_from(pb::Assign { trace_parent: Some(traced.into()), ..assign() }).unwrap();
        assert_eq!(a.trace_parent.as_ref().map(TraceParent::as_str), Some(traced));
        let a = Assignment::try_from(pb::Assign { trace_parent: Some("00-zz".into()), ..assign() }).unwrap();
        assert_eq!(a.trace_parent, None);
    }

    /// The reasons the shard task used to report, word for word.
    #[test]
    fn a_bad_assign_is_rejected_with_the_same_reason_as_before() {
        assert_eq!(rejected(pb::Assign { scan: None, ..assign() }), "assign without scan parameters");
        let with = |f: fn(&mut pb::Assign)| {
            let mut a = assign();
            f(&mut a);
            rejected(a)
        };
        let bad_addrs = with(|a| a.scan.as_mut().unwrap().address_ranges = vec!["10.0.0.300".into()]);
        let spec = AddressSet::parse_ranges(&["10.0.0.300"]).unwrap_err();
        assert_eq!(bad_addrs, format!("address ranges: {spec}"));
        let bad_ports = with(|a| a.scan.as_mut().unwrap().ports = "99999".into());
        assert_eq!(bad_ports, format!("ports: {}", PortSet::parse("99999").unwrap_err()));
        let empty = with(|a| a.scan.as_mut().unwrap().address_ranges.clear());
        assert_eq!(empty, "no addresses to scan");
        let size = with(|a| a.scan.as_mut().unwrap().total = 11);
        assert_eq!(size, "index space of 10 positions, the controller planned 11");
        assert_eq!(with(|a| a.end_index = 11), "range 4..11 outside the scan's 10 positions");
        assert_eq!(with(|a| a.start_index = 10_000), "range 10000..10 outside the scan's 10 positions");
        assert_eq!(with(|a| a.scan.as_mut().unwrap().scan_type = 0), "unknown scan type 0");
        assert_eq!(with(|a| a.scan.as_mut().unwrap().scan_type = 99), "unknown scan type 99");
    }

    #[test]
    fn an_assign_without_a_lease_names_nothing_to_fail() {
        for (shard_id, lease_epoch) in [(0, 1), (1, 0), (MAX_WIRE_ID + 1, 1), (1, u64::MAX)] {
            let a = pb::Assign { shard_id, lease_epoch, ..assign() };
            assert!(matches!(Assignment::try_from(a), Err(AssignError::Ids(_))), "{shard_id} {lease_epoch}");
        }
        let msg = pb::ControllerMessage { frame: Some(In::Assign(pb::Assign { shard_id: 0, ..assign() })) };
        let err = Inbound::try_from(msg).unwrap_err();
        assert_eq!(err.to_string(), format!("Assign: shard_id 0 is out of range (1..={MAX_WIRE_ID})"));
    }

    #[test]
    fn ids_are_checked_both_ways() {
        assert_eq!(ShardId::try_from(1).map(u64::from), Ok(1));
        assert_eq!(Seq::try_from(MAX_WIRE_ID).map(Seq::get), Ok(MAX_WIRE_ID));
        assert_eq!(LeaseEpoch::try_from(0), Err(IdError { what: "lease_epoch", value: 0 }));
        assert!(Seq::try_from(MAX_WIRE_ID + 1).is_err());
        assert_eq!(Seq::FIRST.next(), Seq(2));
        assert_eq!(Seq(MAX_WIRE_ID).next(), Seq(MAX_WIRE_ID));
    }

    #[test]
    fn welcome_limits_are_clamped_and_the_hold_follows_the_shorter_lapse() {
        let w = Welcome::from(pb::Welcome {
            protocol_version: 1,
            session_generation: 9,
            heartbeat_interval_ms: 5,
            limits: Some(pb::Limits {
                max_batch_results: 0,
                max_unacked_frames: u32::MAX,
                lease_ttl_ms: 10_000,
                disconnect_grace_ms: 3_000,
            }),
            controller_id: "c\n1".into(),
            revoked: vec![pb::HeldLease { shard_id: 4, lease_epoch: 1 }, pb::HeldLease { shard_id: 0, lease_epoch: 1 }],
        });
        assert_eq!(w.heartbeat, Duration::from_millis(100));
        assert_eq!(w.limits, Limits { max_batch: 1, max_unacked: 10_000 });
        assert_eq!((w.lapse, w.echoes), (Some(Duration::from_secs(3)), true));
        assert_eq!(w.revoked, [LeaseId { shard: ShardId(4), epoch: LeaseEpoch(1) }]);
        assert_eq!((w.generation, w.controller_id.as_str()), (9, "c 1"));
        // An older controller: no limits, no grace, no echoes.
        let old = Welcome::from(pb::Welcome { heartbeat_interval_ms: 3_600_000, ..Default::default() });
        assert_eq!(old.limits, Limits { max_batch: 1, max_unacked: 2 });
        assert_eq!((old.heartbeat, old.lapse, old.echoes), (Duration::from_secs(60), None, false));
    }

    #[test]
    fn lease_frames_convert_with_checked_ids() {
        let lease = LeaseId { shard: ShardId(5), epoch: LeaseEpoch(2) };
        let frame = |f| pb::ControllerMessage { frame: Some(f) };
        let ack = Inbound::try_from(frame(In::Ack(pb::Ack { shard_id: 5, lease_epoch: 2, seq: 3 }))).unwrap();
        assert!(matches!(ack, Inbound::Ack(Ack { lease: l, seq: Seq(3) }) if l == lease));
        assert!(Inbound::try_from(frame(In::Ack(pb::Ack { shard_id: 5, lease_epoch: 2, seq: 0 }))).is_err());
        let cancel = pb::Cancel { shard_id: 5, lease_epoch: 2, reason: "scan cancelled".into() };
        assert!(
            matches!(Inbound::try_from(frame(In::Cancel(cancel))).unwrap(), Inbound::Cancel(c) if c.lease == lease)
        );
        let rate = pb::RateUpdate { shard_id: 5, lease_epoch: 0, rate: 10 };
        assert!(matches!(Inbound::try_from(frame(In::Rate(rate))), Err(FrameError::Ids { frame: "RateUpdate", .. })));
        assert!(matches!(Inbound::try_from(frame(In::Drain(pb::Drain {}))).unwrap(), Inbound::Drain));
        assert_eq!(Inbound::try_from(pb::ControllerMessage { frame: None }).unwrap_err(), FrameError::Empty);
    }

    #[test]
    fn refusals_keep_their_reason_and_may_name_no_lease() {
        let stale = Refused::from(pb::Refused {
            shard_id: 5,
            lease_epoch: 2,
            seq: 7,
            reason: pb::RefusalReason::StaleEpoch.into(),
            message: "gone".into(),
        });
        assert_eq!(stale.lease, Some(LeaseId { shard: ShardId(5), epoch: LeaseEpoch(2) }));
        assert!(stale.reason.lease_gone() && RefusalReason::from(pb::RefusalReason::UnknownShard as i32).lease_gone());
        let hello = Refused::from(pb::Refused { reason: pb::RefusalReason::Invalid.into(), ..Default::default() });
        assert_eq!((hello.lease, hello.seq, hello.reason), (None, None, RefusalReason::Invalid));
        assert!(!hello.reason.lease_gone());
        assert_eq!(RefusalReason::from(42), RefusalReason::Other(42));
    }

    #[test]
    fn outbound_frames_are_built_from_domain_values() {
        let lease = LeaseId { shard: ShardId(5), epoch: LeaseEpoch(2) };
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let finding =
            crate::engine::Finding { ip: "2001:db8::1".parse().unwrap(), port: 443, position: 9, observed_at: at };
        let service = portfleet_core::Service { name: "https".into(), verified: true, ..Default::default() };
        let found = Identified { finding, service: Some(service), answers_everything: false };
        let trace_parent = TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let results = vec![found];
        let msg =
            pb::AgentMessage::from(Outbound::Shard(ShardFrame::Results { lease, seq: Seq(4), results, trace_parent }));
        let Some(Out::Results(b)) = msg.frame else { panic!("{msg:?}") };
        assert_eq!((b.shard_id, b.lease_epoch, b.seq), (5, 2, 4));
        assert_eq!(b.trace_parent.as_deref(), Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
        assert_eq!(
            (b.results[0].ip.len(), b.results[0].port, b.results[0].state),
            (16, 443, pb::PortState::Open as i32)
        );
        assert_eq!(b.results[0].observed_at, Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 5 }));
        assert_eq!(b.results[0].service.as_ref().map(|s| s.name.as_str()), Some("https"));
        let released = pb::AgentMessage::from(Outbound::Shard(ShardFrame::Released { lease, agent_leaving: true }));
        assert_eq!(
            released.frame,
            Some(Out::Released(pb::ShardReleased { shard_id: 5, lease_epoch: 2, agent_leaving: true }))
        );
        let hello = pb::Hello::from(Hello {
            agent_id: Uuid::nil(),
            name: "a".into(),
            version: "0".into(),
            capabilities: Capabilities { raw_socket: true, ipv6: false },
            labels: "site=lab".parse().unwrap(),
            max_rate: 0,
            max_shards: 2,
            held: vec![lease],
        });
        assert_eq!(
            (hello.min_protocol_version, hello.max_protocol_version),
            (PROTOCOL_VERSION_MIN, PROTOCOL_VERSION_MAX)
        );
        assert_eq!(hello.held, [pb::HeldLease { shard_id: 5, lease_epoch: 2 }]);
        assert_eq!(hello.labels.get("site").map(String::as_str), Some("lab"));
    }

    #[test]
    fn timestamps_round_trip_and_nonsense_is_no_time() {
        let at = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(system_time(&timestamp(at)), Some(at));
        assert_eq!(system_time(&prost_types::Timestamp { seconds: -5, nanos: -1 }), None);
        assert_eq!(system_time(&prost_types::Timestamp { seconds: 1, nanos: 1_000_000_000 }), None);
        // The far end of the range converts or not, but never panics.
        let _ = system_time(&prost_types::Timestamp { seconds: i64::MAX, nanos: 999_999_999 });
        let echo = pb::ControllerMessage {
            frame: Some(In::Heartbeat(pb::Heartbeat { sent_at: Some(timestamp(at)), ..Default::default() })),
        };
        assert!(matches!(Inbound::try_from(echo).unwrap(), Inbound::HeartbeatEcho { sent_at: Some(t) } if t == at));
    }

    proptest! {
        /// Whatever an Assign holds, converting it never panics, and what
        /// it accepts is a range inside a space of the planned size.
        #[test]
        fn any_assign_converts_or_is_rejected(
            shard_id in prop_oneof![Just(0u64), Just(u64::MAX), 1u64..100],
            ranges in proptest::collection::vec("[0-9a-f.:/-]{0,20}", 0..4),
            ports in "[0-9,-]{0,12}",
            total in 0u64..2000,
            start in 0u64..2000,
            end in 0u64..2000,
            scan_type in -1i32..4,
        ) {
            let a = pb::Assign {
                shard_id,
                lease_epoch: 1,
                scan: Some(pb::ScanParameters { address_ranges: ranges, ports, total, scan_type, ..scan() }),
                start_index: start,
                end_index: end,
                rate: 1,
                trace_parent: None,
            };
            if let Ok(a) = Assignment::try_from(a) {
                prop_assert_eq!(a.space.len(), total);
                prop_assert!(a.range.start <= a.range.end && a.range.end <= total);
            }
        }
    }
}
