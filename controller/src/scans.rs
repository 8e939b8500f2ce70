//! Scan creation and lifecycle, independent of gRPC and AMQP: both adapters
//! turn their messages into a [`ScanRequestInput`], and everything after
//! that (validation, DNS, planning, storage) happens here once.

use std::{collections::BTreeMap, net::IpAddr, sync::Arc, time::Duration};

use chrono::{DateTime, Utc};

use futures::{StreamExt, TryStreamExt, stream};
use portfleet_core::{
    AddressSet, CdnPolicy, PlanInput, PortSet, ResolvedTarget, ScanType, ScopePolicy, ShardPolicy, TargetSpec, cdn,
    labels, plan, space::Limited, text,
};
use portfleet_telemetry::{otel, otel::TraceParent, trace_span};
use tokio::sync::Semaphore;
use tracing::{Instrument, Span};
use uuid::Uuid;

pub use crate::naabum8::HostnameSelection;
use crate::{
    policy::PolicySource,
    store::{NaabuM8Db, NewScan, NewShard, Page, Paged, ScanRecord, ScanState, Shaping, Store, StoreError},
};

pub use crate::store::Origin;

/// Limits on what one scan may ask for.
#[derive(Clone, Debug)]
pub struct ScanLimits {
    /// Addresses x ports.
    pub max_probes: u64,
    /// Target entries after expanding a group.
    pub max_targets: u32,
    pub max_rate: u32,
    pub max_retries: u32,
    pub default_rate: u32,
    pub default_retries: u32,
    pub default_ports: String,
    pub shards: ShardPolicy,
    /// One DNS lookup's timeout.
    pub resolve_timeout: Duration,
    /// Hostnames one scan may name, after expanding its target group.
    pub max_hostnames: u32,
    /// All of one scan's lookups together.
    pub resolve_deadline: Duration,
    /// DNS lookups in flight at once on this controller, all scans
    /// together (each holds a blocking thread while it waits).
    pub max_lookups: usize,
    /// The shortest interval a schedule may have.
    pub min_schedule_interval: Duration,
}

impl Default for ScanLimits {
    fn default() -> Self {
        Self {
            max_probes: 1 << 32,
            max_targets: 100_000,
            max_rate: 10_000_000,
            max_retries: 10,
            default_rate: 1_000,
            default_retries: 1,
            default_ports: "top-100".into(),
            shards: ShardPolicy::default(),
            resolve_timeout: Duration::from_secs(5),
            max_hostnames: 1000,
            resolve_deadline: Duration::from_secs(30),
            max_lookups: 64,
            min_schedule_interval: Duration::from_secs(60),
        }
    }
}

/// A scan request as any adapter received it, not yet validated.
#[derive(Clone, Debug, Default)]
pub struct ScanRequestInput {
    pub targets: Vec<String>,
    pub target_group: String,
    pub ports: String,
    pub scan_type: Option<ScanType>,
    /// 0 means the default.
    pub rate: u32,
    pub retries: Option<u32>,
    pub request_id: String,
    pub labels: BTreeMap<String, String>,
    pub agent_selector: BTreeMap<String, String>,
    pub allow_connect_fallback: bool,
    /// `None` means the default: identify.
    pub identify: Option<bool>,
    /// `None` means the default ([`DEFAULT_PORT_THRESHOLD`]).
    pub port_threshold: Option<u32>,
    /// `None` means the default ([`DEFAULT_PRIORITY`]).
    pub priority: Option<u32>,
    /// 0: no limit.
    pub max_agents: u32,
    /// 0: no limit.
    pub max_parallel_shards: u32,
    /// Hostnames from NaabuM8's table (`--naabum8-database-url`), besides
    /// `targets`.
    pub naabum8: Option<HostnameSelection>,
    /// Addresses, CIDRs and ranges never probed.
    pub exclude: Vec<String>,
    /// Ports never probed (a port spec; empty: none).
    pub exclude_ports: String,
    /// `None`: both families.
    pub ip_version: Option<IpVersion>,
    /// `None`: every address of each name.
    pub scan_all_ips: Option<bool>,
    /// `None`: [`CdnPolicy::All`].
    pub cdn_policy: Option<CdnPolicy>,
    pub deadline: Option<DateTime<Utc>>,
    /// The schedule firing this run (set by the schedule runner only).
    pub schedule_id: Option<Uuid>,
    /// Where the request came from, and where to reply (AMQP).
    pub origin: Origin,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// The trace the request belongs to.
    pub trace: RequestTrace,
}

/// The trace a request belongs to: the span its adapter opened for it
/// (`amqp.consume`, CreateScan; `Span::none()` when traces are off) and
/// the trace context the caller sent, which is passed on unchanged when
/// this controller does not export traces.
#[derive(Clone, Debug)]
pub struct RequestTrace {
    pub span: Span,
    pub parent: Option<TraceParent>,
}

impl Default for RequestTrace {
    fn default() -> Self {
        Self { span: Span::none(), parent: None }
    }
}

/// A validated scan request with defaults filled in.
#[derive(Clone, Debug)]
pub struct ScanRequest {
    pub targets: Vec<TargetSpec>,
    pub target_group: Option<String>,
    pub ports: PortSet,
    pub scan_type: ScanType,
    pub rate: u32,
    pub retries: u32,
    pub request_id: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub agent_selector: BTreeMap<String, String>,
    pub allow_connect_fallback: bool,
    pub identify: bool,
    pub port_threshold: u32,
    /// Weight of the scan's share of the fleet's slots, 1 to 10.
    pub priority: u32,
    /// Most agents, and most leased shards, at once (0: no limit).
    pub max_agents: u32,
    pub max_parallel_shards: u32,
    pub naabum8: Option<HostnameSelection>,
    /// Never probed: addresses, and ports (already taken out of `ports`).
    pub exclude: AddressSet,
    pub exclude_specs: Vec<String>,
    pub exclude_ports: Option<PortSet>,
    pub ip_version: IpVersion,
    pub scan_all_ips: bool,
    pub cdn_policy: CdnPolicy,
    pub deadline: Option<DateTime<Utc>>,
    pub schedule_id: Option<Uuid>,
    pub origin: Origin,
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
    /// What the scan's later spans (each Assign's) continue: stored with it.
    pub trace_parent: Option<TraceParent>,
}

/// Which of a hostname's addresses a scan probes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IpVersion {
    #[default]
    Both,
    V4,
    V6,
}

impl IpVersion {
    /// As stored: 0 (both), 4 or 6.
    pub fn as_i16(self) -> i16 {
        match self {
            Self::Both => 0,
            Self::V4 => 4,
            Self::V6 => 6,
        }
    }

    pub fn from_i16(v: i16) -> Self {
        match v {
            4 => Self::V4,
            6 => Self::V6,
            _ => Self::Both,
        }
    }

    fn admits(self, ip: IpAddr) -> bool {
        match self {
            Self::Both => true,
            Self::V4 => ip.is_ipv4(),
            Self::V6 => ip.is_ipv6(),
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Both => "addresses",
            Self::V4 => "IPv4 addresses",
            Self::V6 => "IPv6 addresses",
        }
    }
}

/// Open ports on one address above which a scan reports the address as
/// answering everything (a SYN proxy or tarpit), like naabu's `-pts`.
pub const DEFAULT_PORT_THRESHOLD: u32 = 100;

/// The priorities a scan may have (its weight in the fair share of the
/// agents' slots), and the default.
pub const PRIORITIES: std::ops::RangeInclusive<u32> = 1..=10;
pub const DEFAULT_PRIORITY: u32 = 5;

/// The largest `max_agents` / `max_parallel_shards` (0 is no limit).
pub const MAX_PARALLEL: u32 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("{field}: {message}")]
    InvalidArgument { field: String, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Outside the scope policy.
    #[error("{0}")]
    PermissionDenied(String),
    /// A `request_id` that another, different request already used.
    #[error("{0}")]
    AlreadyExists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(field: impl Into<String>, message: impl ToString) -> ScanError {
    ScanError::InvalidArgument { field: field.into(), message: message.to_string() }
}

impl ScanRequestInput {
    /// Whether creating the scan waits on DNS (a hostname, or a target
    /// group whose targets may hold names): the AMQP ingress stores such
    /// requests apart, so they never hold up a batch.
    pub fn needs_lookup(&self) -> bool {
        !self.target_group.trim().is_empty()
            || self.naabum8.is_some()
            || self.targets.iter().any(|t| matches!(TargetSpec::parse(t), Ok(TargetSpec::Hostname(_))))
    }

    pub fn validate(self, limits: &ScanLimits) -> Result<ScanRequest, ScanError> {
        let targets = self
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| TargetSpec::parse(t).map_err(|e| invalid(format!("targets[{i}]"), e)))
            .collect::<Result<Vec<_>, _>>()?;
        let target_group = Some(self.target_group.trim().to_string()).filter(|g| !g.is_empty());
        if targets.is_empty() && target_group.is_none() && self.naabum8.is_none() {
            return Err(invalid("targets", "give at least one target or a target_group"));
        }
        if targets.len() > limits.max_targets as usize {
            return Err(invalid(
                "targets",
                format!("{} targets exceed the maximum of {}", targets.len(), limits.max_targets),
            ));
        }
        let ports = if self.ports.trim().is_empty() {
            PortSet::parse(&limits.default_ports)
        } else {
            PortSet::parse(&self.ports)
        }
        .map_err(|e| invalid("ports", e))?;
        let rate = match self.rate {
            0 => limits.default_rate,
            r if r > limits.max_rate => {
                return Err(invalid("rate", format!("{r} exceeds the maximum of {}", limits.max_rate)));
            }
            r => r,
        };
        let retries = self.retries.unwrap_or(limits.default_retries);
        if retries > limits.max_retries {
            return Err(invalid("retries", format!("{retries} exceeds the maximum of {}", limits.max_retries)));
        }
        let request_id = Some(self.request_id.trim().to_string()).filter(|r| !r.is_empty());
        check_text("request_id", request_id.as_deref().unwrap_or(""), 256)?;
        check_text("target_group", target_group.as_deref().unwrap_or(""), 128)?;
        // AMQP short strings: at most 255 bytes.
        check_text("reply_to", self.reply_to.as_deref().unwrap_or(""), 255)?;
        check_text("correlation_id", self.correlation_id.as_deref().unwrap_or(""), 255)?;
        labels::check_all(&self.labels).map_err(|e| invalid("labels", e))?;
        labels::check_all(&self.agent_selector).map_err(|e| invalid("agent_selector", e))?;
        let port_threshold = self.port_threshold.unwrap_or(DEFAULT_PORT_THRESHOLD);
        if port_threshold > u32::from(u16::MAX) {
            return Err(invalid("port_threshold", format!("{port_threshold} exceeds the number of ports, 65535")));
        }
        let priority = self.priority.unwrap_or(DEFAULT_PRIORITY);
        if !PRIORITIES.contains(&priority) {
            return Err(invalid(
                "priority",
                format!("{priority} is out of range: {} (least) to {} (most)", PRIORITIES.start(), PRIORITIES.end()),
            ));
        }
        for (field, n) in [("max_agents", self.max_agents), ("max_parallel_shards", self.max_parallel_shards)] {
            if n > MAX_PARALLEL {
                return Err(invalid(field, format!("{n} exceeds the maximum of {MAX_PARALLEL} (0: no limit)")));
            }
        }
        if self.exclude.len() > limits.max_targets as usize {
            return Err(invalid(
                "exclude",
                format!("{} entries exceed the maximum of {}", self.exclude.len(), limits.max_targets),
            ));
        }
        let mut exclude_specs = Vec::with_capacity(self.exclude.len());
        let mut excluded = Vec::with_capacity(self.exclude.len());
        for (i, e) in self.exclude.iter().enumerate() {
            let field = format!("exclude[{i}]");
            let spec = TargetSpec::parse(e).map_err(|err| invalid(&field, err))?;
            let Some(range) = spec.range() else {
                return Err(invalid(
                    field,
                    format!("{e:?}: exclusions are addresses, CIDR blocks or ranges, not hostnames"),
                ));
            };
            excluded.push(range);
            exclude_specs.push(spec.to_string());
        }
        let exclude_ports = match self.exclude_ports.trim() {
            "" => None,
            spec => Some(PortSet::parse(spec).map_err(|e| invalid("exclude_ports", e))?),
        };
        let ports = match &exclude_ports {
            None => ports,
            Some(out) => ports
                .subtract(out)
                .ok_or_else(|| invalid("exclude_ports", format!("excludes every requested port ({ports})")))?,
        };
        if let Some(deadline) = self.deadline
            && deadline <= Utc::now()
        {
            return Err(invalid("deadline", format!("{} is in the past", deadline.to_rfc3339())));
        }
        Ok(ScanRequest {
            targets,
            target_group,
            ports,
            scan_type: self.scan_type.unwrap_or_default(),
            rate,
            retries,
            request_id,
            labels: self.labels,
            agent_selector: self.agent_selector,
            allow_connect_fallback: self.allow_connect_fallback,
            identify: self.identify.unwrap_or(true),
            port_threshold,
            priority,
            max_agents: self.max_agents,
            max_parallel_shards: self.max_parallel_shards,
            naabum8: self.naabum8,
            exclude: AddressSet::new(excluded),
            exclude_specs,
            exclude_ports,
            ip_version: self.ip_version.unwrap_or_default(),
            scan_all_ips: self.scan_all_ips.unwrap_or(true),
            cdn_policy: self.cdn_policy.unwrap_or_default(),
            deadline: self.deadline,
            schedule_id: self.schedule_id,
            origin: self.origin,
            reply_to: self.reply_to.filter(|r| !r.is_empty()),
            correlation_id: self.correlation_id.filter(|c| !c.is_empty()),
            trace_parent: self.trace.parent,
        })
    }
}

impl ScanRequest {
    /// A digest of what the request asks for, after normalisation (defaults
    /// filled in, ports canonical, targets sorted): the same `request_id`
    /// with the same fingerprint is a retry, with another a conflict. Where
    /// the request came from and where to reply are not part of it.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut targets: Vec<String> = self.targets.iter().map(ToString::to_string).collect();
        targets.sort_unstable();
        targets.dedup();
        let mut canonical = serde_json::json!({
            "targets": targets,
            "target_group": self.target_group,
            "ports": self.ports.to_string(),
            "scan_type": self.scan_type.as_str(),
            "rate": self.rate,
            "retries": self.retries,
            "labels": self.labels,
            "agent_selector": self.agent_selector,
            "allow_connect_fallback": self.allow_connect_fallback,
        });
        // Added later: only when not the default, so requests stored before
        // them keep their fingerprints.
        if !self.identify {
            canonical["identify"] = false.into();
        }
        if self.port_threshold != DEFAULT_PORT_THRESHOLD {
            canonical["port_threshold"] = self.port_threshold.into();
        }
        if self.priority != DEFAULT_PRIORITY {
            canonical["priority"] = self.priority.into();
        }
        if self.max_agents != 0 {
            canonical["max_agents"] = self.max_agents.into();
        }
        if self.max_parallel_shards != 0 {
            canonical["max_parallel_shards"] = self.max_parallel_shards.into();
        }
        if let Some(selection) = &self.naabum8 {
            canonical["naabum8"] = selection.fingerprint();
        }
        // NaabuM8 envelopes cannot set these: their fixed values are not
        // part of what a redelivery stored before them is compared with.
        if self.origin != Origin::NaabuM8 {
            if !self.exclude.is_empty() {
                canonical["exclude"] = self.exclude.to_strings().into();
            }
            if let Some(ports) = &self.exclude_ports {
                canonical["exclude_ports"] = ports.to_string().into();
            }
            if self.ip_version != IpVersion::Both {
                canonical["ip_version"] = self.ip_version.as_i16().into();
            }
            if !self.scan_all_ips {
                canonical["scan_all_ips"] = false.into();
            }
            if self.cdn_policy != CdnPolicy::All {
                canonical["cdn_policy"] = self.cdn_policy.as_str().into();
            }
            // A schedule's run is keyed by its due time; its deadline follows
            // the time it fired, so a retry of the run has another.
            if let Some(deadline) = self.deadline
                && self.schedule_id.is_none()
            {
                canonical["deadline"] = deadline.to_rfc3339().into();
            }
        }
        let digest = Sha256::digest(canonical.to_string().as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("v1:{hex}")
    }
}

/// The scan a request's `request_id` names, if it was made by the same
/// request: a retry gets it back, a different request with the key is
/// refused (like Stripe's idempotency keys). A scan stored before
/// fingerprints were kept matches any request.
fn same_request(existing: ScanRecord, fingerprint: Option<&str>) -> Result<ScanRecord, ScanError> {
    match (&existing.request_fingerprint, fingerprint) {
        (Some(stored), Some(asked)) if stored != asked => Err(ScanError::AlreadyExists(format!(
            "request_id {} was used by scan {} with a different request",
            existing.request_id.as_deref().unwrap_or_default(),
            existing.id
        ))),
        _ => Ok(existing),
    }
}

/// Free text must be storable (no NUL) and loggable (no control
/// characters): checked before anything is stored.
fn check_text(field: &str, value: &str, max: usize) -> Result<(), ScanError> {
    text::check(value, max).map_err(|e| invalid(field, e))
}

/// A request's plan, before the policy check.
struct Planned {
    plan: portfleet_core::Plan,
    stored_targets: Vec<String>,
    seed: u64,
    /// Each hostname and the addresses it stands for in the scan.
    resolved: BTreeMap<String, Vec<IpAddr>>,
    /// Addresses the exclusions (and a CDN skip) removed.
    excluded: u128,
    /// CDN edges among the addresses left after the exclusions.
    edges: AddressSet,
}

/// Ranges and agents a preview lists at most (it counts them all).
const PREVIEW_RANGES: usize = 1000;
const PREVIEW_AGENTS: i64 = 100;

/// What a scan request would do (`validate_only`).
#[derive(Clone, Debug)]
pub struct ScanPreview {
    /// After resolution, exclusions and the CDN policy (the first 1000).
    pub address_ranges: Vec<String>,
    pub address_count: u64,
    /// Probes sent once each (CDN edges' other ports left out).
    pub probes: u64,
    pub shard_count: u32,
    pub resolved: BTreeMap<String, Vec<IpAddr>>,
    pub excluded: u64,
    pub cdn: Vec<CdnEdge>,
    /// `None`: the scope policy allows it.
    pub policy_verdict: Option<String>,
    pub capable_agents: Vec<String>,
    pub capable_agent_count: u32,
    /// At the requested rate with every retry: an upper bound.
    pub estimated: Duration,
    /// The ports after exclusions, canonical.
    pub ports: String,
}

/// CDN edge addresses in a scan.
#[derive(Clone, Debug)]
pub struct CdnEdge {
    pub range: String,
    pub provider: &'static str,
    pub policy: CdnPolicy,
}

/// `a` ∩ `b`.
fn intersect(a: &AddressSet, b: &AddressSet) -> AddressSet {
    a.subtract(&a.subtract(b))
}

/// A request after planning: a new scan to store, or the one its key
/// already names.
enum Prepared {
    New(Box<NewScan>),
    Existing(Box<ScanRecord>),
}

/// Creates, reads and cancels scans.
#[derive(Clone, Debug)]
pub struct ScanManager {
    store: Store,
    limits: ScanLimits,
    policy: PolicySource,
    /// Bounds the DNS lookups in flight across all requests.
    lookups: Arc<Semaphore>,
    /// NaabuM8's database, where [`HostnameSelection`]s are read.
    naabum8: Option<NaabuM8Db>,
}

impl ScanManager {
    pub fn new(store: Store, limits: ScanLimits) -> Self {
        let policy = PolicySource::new(store.clone());
        let lookups = Arc::new(Semaphore::new(limits.max_lookups.max(1)));
        Self { store, limits, policy, lookups, naabum8: None }
    }

    /// Reads NaabuM8 hostname selections from `db`.
    pub fn with_naabum8(mut self, db: NaabuM8Db) -> Self {
        self.naabum8 = Some(db);
        self
    }

    pub fn limits(&self) -> &ScanLimits {
        &self.limits
    }

    pub fn policy(&self) -> &PolicySource {
        &self.policy
    }

    /// Changes the scope rules and politeness caps, then fails every
    /// pending or running scan the new policy no longer allows (their
    /// agents are told to stop). Returns the failed scans. New caps reach
    /// running scans at the schedulers' next rebalance (within a second).
    pub async fn update_policy(
        &self,
        add: &crate::store::ScopeRules,
        remove: &crate::store::ScopeRules,
        caps: crate::store::CapsUpdate,
    ) -> Result<Vec<Uuid>, ScanError> {
        self.store.update_scope_rules(add, remove, caps).await?;
        self.policy.invalidate();
        let policy = self.policy.current().await?;
        let mut failed = Vec::new();
        let mut after = None;
        loop {
            let page = self.store.active_scan_ranges(after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = Some(last.id);
            for crate::store::ActiveScanRanges { id, address_ranges: ranges } in page {
                let addrs = AddressSet::parse_ranges(&ranges)
                    .map_err(|e| StoreError::Corrupt(format!("scan {id} address ranges: {e}")))?;
                if let Some(range) = policy.first_offending(&addrs) {
                    let why = format!(
                        "the scope policy changed: {range} may no longer be scanned: {}",
                        crate::policy::refusal(&policy, range)
                    );
                    if self.store.fail_scan(id, &why).await? {
                        tracing::warn!(scan_id = %id, %why, "scan failed by a policy change");
                        failed.push(id);
                    }
                }
            }
        }
        Ok(failed)
    }

    /// Validates, resolves, plans and stores a scan. The same request id
    /// with the same request returns the scan it first created; with a
    /// different request it is refused (`AlreadyExists`). The flag says
    /// whether this call created the scan.
    pub async fn create(&self, input: ScanRequestInput) -> Result<(ScanRecord, bool), ScanError> {
        let mut outcomes = self.create_many(vec![input]).await?;
        outcomes.pop().unwrap_or_else(|| Err(StoreError::Corrupt("no outcome for a scan request".into()).into()))
    }

    /// [`ScanManager::create`] for many requests at once (the AMQP ingress
    /// takes them in batches): each is validated, resolved and planned on
    /// its own, and all that pass are stored in one statement. An `Err` of
    /// the whole call means nothing was stored; per-request errors are in
    /// the list, in input order.
    pub async fn create_many(
        &self,
        inputs: Vec<ScanRequestInput>,
    ) -> Result<Vec<Result<(ScanRecord, bool), ScanError>>, StoreError> {
        // One span per request, in its adapter's trace (only when traces
        // are exported); the scan keeps its context for the Assigns.
        let spans: Vec<Span> = inputs.iter().map(create_span).collect();
        let requests: Vec<Result<ScanRequest, ScanError>> = inputs
            .into_iter()
            .zip(&spans)
            .map(|(i, span)| {
                let mut req = i.validate(&self.limits)?;
                req.trace_parent = otel::propagate(span, req.trace_parent.as_ref());
                Ok(req)
            })
            .collect();
        // Known keys come back as they are, without planning anything.
        let keys: Vec<String> = requests.iter().filter_map(|r| r.as_ref().ok()?.request_id.clone()).collect();
        let known: std::collections::HashMap<String, ScanRecord> = self
            .store
            .scans_by_request_ids(&keys)
            .await?
            .into_iter()
            .filter_map(|r| Some((r.request_id.clone()?, r)))
            .collect();
        // One policy for the whole batch; checked again if it changes
        // before the batch is stored (a policy update on any controller).
        let mut attempts = 0;
        let (prepared, stored) = loop {
            attempts += 1;
            let policy = self.policy.current().await?;
            // Owned copies: a stream of borrowed requests trips the compiler's
            // higher-ranked lifetime inference in Send futures.
            let owned: Vec<Option<ScanRequest>> = requests.iter().map(|r| r.as_ref().ok().cloned()).collect();
            let prepared: Vec<Option<Result<Prepared, ScanError>>> = stream::iter(owned.into_iter().zip(spans.clone()))
                .map(|(req, span)| self.prepare_known(req, &known, &policy).instrument(span))
                .buffered(32)
                .collect()
                .await;
            let new: Vec<NewScan> = prepared
                .iter()
                .filter_map(|p| match p {
                    Some(Ok(Prepared::New(n))) => Some((**n).clone()),
                    _ => None,
                })
                .collect();
            // The one statement stores them all: each new scan's trace gets
            // a span of it, the statement's own under it when it is one scan.
            let store_spans: Vec<Span> = prepared
                .iter()
                .zip(&spans)
                .filter(|(p, _)| matches!(p, Some(Ok(Prepared::New(_)))))
                .map(|(_, span)| span.in_scope(|| trace_span!("scan.store", scans = new.len())))
                .collect();
            let insert = self.store.insert_scans(&new, policy.version);
            let inserted = match store_spans.as_slice() {
                [one] => insert.instrument(one.clone()).await,
                _ => insert.await,
            };
            drop(store_spans);
            match inserted {
                Err(StoreError::PolicyChanged) if attempts < 3 => {
                    tracing::info!("the scope policy changed while scans were checked; checking them again");
                    self.policy.invalidate();
                }
                stored => break (prepared, stored?),
            }
        };
        let mut stored = stored.into_iter();
        let outcomes = requests
            .into_iter()
            .zip(prepared)
            .zip(&spans)
            .map(|((req, p), span)| {
                let outcome = stored_outcome(req, p, &mut stored);
                match &outcome {
                    Ok((record, created)) => {
                        span.record("scan_id", tracing::field::display(record.id));
                        if *created {
                            span.in_scope(|| {
                                tracing::info!(scan_id = %record.id, probes = record.probes_planned,
                                    shards = record.shard_count, origin = %record.origin, "scan created")
                            });
                        }
                    }
                    Err(e) => {
                        span.record("otel.status_code", "error");
                        span.record("otel.status_description", tracing::field::display(e));
                    }
                }
                outcome
            })
            .collect();
        Ok(outcomes)
    }
}

/// The span of one request's creation (`scan.create`), a child of its
/// adapter's span, or a trace of its own when it came without one.
fn create_span(input: &ScanRequestInput) -> Span {
    trace_span!(parent: &input.trace.span, "scan.create", otel.kind = "internal",
        request_id = %input.request_id, origin = %input.origin, scan_id = tracing::field::Empty,
        otel.status_code = tracing::field::Empty, otel.status_description = tracing::field::Empty)
}

/// What became of one request of a batch: its error, the scan its key
/// already named, or the next of the stored scans.
fn stored_outcome(
    req: Result<ScanRequest, ScanError>,
    prepared: Option<Result<Prepared, ScanError>>,
    stored: &mut impl Iterator<Item = Result<(ScanRecord, bool), StoreError>>,
) -> Result<(ScanRecord, bool), ScanError> {
    match (req, prepared) {
        (Err(e), _) | (Ok(_), Some(Err(e))) => Err(e),
        (Ok(_), None) => Err(StoreError::Corrupt("a checked scan went missing".into()).into()),
        (Ok(_), Some(Ok(Prepared::Existing(r)))) => Ok((*r, false)),
        (Ok(_), Some(Ok(Prepared::New(n)))) => {
            let (record, created) =
                stored.next().ok_or_else(|| StoreError::Corrupt("a stored scan went missing".into()))??;
            // Another request took the key first (a race, or the same key
            // twice in one batch).
            let record = if created { record } else { same_request(record, n.request_fingerprint.as_deref())? };
            Ok((record, created))
        }
    }
}

impl ScanManager {
    /// A scan its request id already names, or `prepare`d; `None` for a
    /// request that did not validate.
    async fn prepare_known(
        &self,
        req: Option<ScanRequest>,
        known: &std::collections::HashMap<String, ScanRecord>,
        policy: &ScopePolicy,
    ) -> Option<Result<Prepared, ScanError>> {
        let req = req?;
        Some(match req.request_id.as_ref().and_then(|id| known.get(id)) {
            Some(existing) => {
                same_request(existing.clone(), Some(&req.fingerprint())).map(|r| Prepared::Existing(Box::new(r)))
            }
            None => {
                let span = trace_span!("scan.prepare", targets = req.targets.len());
                self.prepare(&req, policy).instrument(span).await.map(|new| Prepared::New(Box::new(new)))
            }
        })
    }

    /// Expands the group, resolves names and plans: everything but the
    /// policy check and storing.
    async fn plan_request(&self, req: &ScanRequest) -> Result<Planned, ScanError> {
        let mut specs: Vec<(TargetSpec, String)> =
            req.targets.iter().enumerate().map(|(i, t)| (t.clone(), format!("targets[{i}]"))).collect();
        if let Some(group) = &req.target_group {
            let room = self.limits.max_targets.saturating_sub(specs.len() as u32);
            let values = self.store.enabled_targets_of_group(group, room + 1).await?;
            if values.is_empty() {
                return Err(invalid("target_group", format!("group {group:?} has no enabled targets")));
            }
            if values.len() > room as usize {
                return Err(invalid(
                    "target_group",
                    format!("the scan would exceed the maximum of {} targets", self.limits.max_targets),
                ));
            }
            for value in values {
                let spec = TargetSpec::parse(&value)
                    .map_err(|e| StoreError::Corrupt(format!("stored target {value:?} of group {group:?}: {e}")))?;
                specs.push((spec, "target_group".into()));
            }
        }
        let mut stored_targets: Vec<String> = req.targets.iter().map(ToString::to_string).collect();
        if let Some(selection) = &req.naabum8 {
            let room = self.limits.max_targets.saturating_sub(specs.len() as u32);
            let names = self.naabum8_hostnames(selection, room).await?;
            for name in names {
                // NaabuM8 handed every name to naabu, which skipped those it
                // could not use: so does this.
                match TargetSpec::parse(&name) {
                    Ok(spec) => {
                        stored_targets.push(name);
                        specs.push((spec, "naabum8".into()));
                    }
                    Err(e) => tracing::warn!(hostname = %name, error = %e, "NaabuM8 hostname skipped"),
                }
            }
        }
        let names = specs.iter().filter(|(s, _)| matches!(s, TargetSpec::Hostname(_))).count();
        if names > self.limits.max_hostnames as usize {
            return Err(invalid(
                "targets",
                format!("{names} hostnames exceed the maximum of {} per scan", self.limits.max_hostnames),
            ));
        }
        let deadline = self.limits.resolve_deadline;
        // A NaabuM8 scan is of a whole inventory, where some names have
        // gone: those are skipped (as naabu did), not fatal.
        let unresolved = if req.naabum8.is_some() { Unresolved::Skip } else { Unresolved::Refuse };
        let pick = Pick { version: req.ip_version, all: req.scan_all_ips };
        let lookups = resolve(&specs, self.limits.resolve_timeout, &self.lookups, unresolved, pick);
        let span = if names > 0 { trace_span!("scan.resolve", hostnames = names) } else { Span::none() };
        let resolved = tokio::time::timeout(deadline, lookups).instrument(span).await.map_err(|_| {
            invalid("targets", format!("{names} hostnames were not all resolved within {deadline:?}"))
        })??;
        if resolved.is_empty() {
            return Err(invalid("naabum8", format!("none of the {names} hostnames resolves")));
        }
        // Exclusions, then CDN edges (skipped, or probed on web ports only).
        let requested = AddressSet::new(resolved.iter().map(|t| t.range));
        let after_exclude = requested.subtract(&req.exclude);
        if after_exclude.is_empty() {
            return Err(invalid(
                "exclude",
                format!("every target address is excluded ({} requested)", requested.len()),
            ));
        }
        let edges = intersect(&after_exclude, cdn::addresses());
        let web = PortSet::parse(&cdn::WEB_PORTS.map(|p| p.to_string()).join(",")).map_err(|e| invalid("ports", e))?;
        let (exclude, limited) = match (req.cdn_policy, req.ports.intersect(&web)) {
            (CdnPolicy::All, _) => (req.exclude.clone(), None),
            (CdnPolicy::WebPorts, Some(ports)) => (req.exclude.clone(), Some(Limited { addrs: edges.clone(), ports })),
            // Web ports only, and none requested: nothing left to probe.
            (CdnPolicy::Skip, _) | (CdnPolicy::WebPorts, None) => {
                (AddressSet::new(req.exclude.ranges().iter().chain(edges.ranges()).copied()), None)
            }
        };
        let remaining = requested.subtract(&exclude);
        if remaining.is_empty() {
            return Err(invalid(
                "cdn_policy",
                format!(
                    "every target address left is a CDN edge that cdn_policy {} leaves out ({} addresses)",
                    req.cdn_policy.as_str(),
                    after_exclude.len()
                ),
            ));
        }
        let excluded = requested.len() - remaining.len();
        let seed: u64 = rand::random();
        let input = PlanInput {
            targets: resolved.clone(),
            ports: req.ports.clone(),
            exclude,
            seed,
            max_probes: self.limits.max_probes,
            shards: self.limits.shards,
            limited,
        };
        let plan = trace_span!("scan.plan", ranges = input.targets.len(), ports = req.ports.len())
            .in_scope(|| plan(input))
            .map_err(|e| invalid("targets", e))?;
        let mut names: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
        for t in &resolved {
            if let Some(name) = &t.hostname {
                names.entry(name.clone()).or_default().push(t.range.first());
            }
        }
        Ok(Planned { plan, stored_targets, seed, resolved: names, excluded, edges })
    }

    /// Plans the request and checks it against the scope policy.
    async fn prepare(&self, req: &ScanRequest, policy: &ScopePolicy) -> Result<NewScan, ScanError> {
        let Planned { plan, stored_targets, seed, .. } = self.plan_request(req).await?;
        let space = &plan.space;
        if let Some(range) = policy.first_offending(space.addresses()) {
            let why = crate::policy::refusal(policy, range);
            metrics::counter!("portfleet_scans_refused_by_policy_total").increment(1);
            return Err(ScanError::PermissionDenied(format!("targets: {range} may not be scanned: {why}")));
        }
        Ok(NewScan {
            id: Uuid::now_v7(),
            request_id: req.request_id.clone(),
            targets: stored_targets,
            target_group: req.target_group.clone().unwrap_or_default(),
            ports: req.ports.to_string(),
            scan_type: req.scan_type.as_str(),
            rate: req.rate as i32,
            retries: req.retries as i32,
            labels: req.labels.clone(),
            agent_selector: req.agent_selector.clone(),
            allow_connect_fallback: req.allow_connect_fallback,
            // Stored as the bit pattern; agents read it back as u64.
            seed: seed as i64,
            address_ranges: space.addresses().to_strings(),
            // The plan caps probes far below i64::MAX.
            address_count: space.addresses().len() as i64,
            port_count: space.ports().len() as i32,
            probes_planned: space.len() as i64,
            has_ipv6: space.addresses().has_ipv6(),
            origin: req.origin,
            reply_to: req.reply_to.clone(),
            correlation_id: req.correlation_id.clone(),
            request_fingerprint: req.request_id.is_some().then(|| req.fingerprint()),
            identify: req.identify,
            // Validated: at most 65535.
            port_threshold: req.port_threshold as i32,
            // Validated: 1 to 10, and at most MAX_PARALLEL.
            priority: req.priority as i32,
            max_agents: req.max_agents as i32,
            max_parallel_shards: req.max_parallel_shards as i32,
            trace_parent: req.trace_parent.as_ref().map(|t| t.as_str().to_string()),
            shaping: Shaping {
                exclude: req.exclude_specs.clone(),
                exclude_ports: req.exclude_ports.as_ref().map(ToString::to_string).unwrap_or_default(),
                ip_version: req.ip_version.as_i16(),
                scan_all_ips: req.scan_all_ips,
                cdn_policy: req.cdn_policy.as_str().into(),
                limited_ranges: space.limited().map(|l| l.addrs.to_strings()).unwrap_or_default(),
                limited_ports: space.limited().map(|l| l.ports.to_string()).unwrap_or_default(),
                deadline: req.deadline,
            },
            schedule_id: req.schedule_id,
            shards: plan.shards.iter().map(|s| NewShard { start: s.start as i64, end: s.end as i64 }).collect(),
            hostnames: plan.hostnames,
        })
    }

    /// What a request would do, without storing anything (`validate_only`):
    /// its plan, the policy's verdict, the agents that could run it and
    /// how long it would take at its rate.
    pub async fn preview(&self, input: ScanRequestInput) -> Result<ScanPreview, ScanError> {
        let req = input.validate(&self.limits)?;
        let policy = self.policy.current().await?;
        let Planned { plan, resolved, excluded, edges, .. } = self.plan_request(&req).await?;
        let space = &plan.space;
        let verdict = policy
            .first_offending(space.addresses())
            .map(|range| format!("{range} may not be scanned: {}", crate::policy::refusal(&policy, range)));
        let raw_socket = req.scan_type == ScanType::Syn && !req.allow_connect_fallback;
        let (capable_agents, capable_agent_count) = self
            .store
            .capable_agents(raw_socket, space.addresses().has_ipv6(), &req.agent_selector, PREVIEW_AGENTS)
            .await?;
        let probes = space.probe_count();
        // Every unanswered probe retried: the longest it can take.
        let sends = probes.saturating_mul(1 + u64::from(req.retries));
        let estimated = Duration::from_secs_f64(sends as f64 / f64::from(req.rate.max(1)));
        let cdn = edges
            .ranges()
            .iter()
            .take(PREVIEW_RANGES)
            .map(|r| CdnEdge {
                range: r.to_string(),
                provider: cdn::provider(r.first()).unwrap_or("cdn"),
                policy: req.cdn_policy,
            })
            .collect();
        Ok(ScanPreview {
            address_ranges: space.addresses().to_strings().into_iter().take(PREVIEW_RANGES).collect(),
            address_count: u64::try_from(space.addresses().len()).unwrap_or(u64::MAX),
            probes,
            shard_count: plan.shards.len() as u32,
            resolved,
            excluded: u64::try_from(excluded).unwrap_or(u64::MAX),
            cdn,
            policy_verdict: verdict,
            capable_agents,
            capable_agent_count,
            estimated,
            ports: req.ports.to_string(),
        })
    }

    /// The names a NaabuM8 selection stands for, at most `room` of them.
    async fn naabum8_hostnames(&self, selection: &HostnameSelection, room: u32) -> Result<Vec<String>, ScanError> {
        let Some(db) = &self.naabum8 else {
            return Err(invalid("naabum8", "this controller has no --naabum8-database-url"));
        };
        let names = db.hostnames(selection, room.saturating_add(1)).await?;
        if names.len() > room as usize {
            return Err(invalid(
                "naabum8",
                format!("the scan would exceed the maximum of {} targets", self.limits.max_targets),
            ));
        }
        if let HostnameSelection::Named(pairs) = selection
            && let Some((id, name)) = pairs.iter().find(|(_, name)| !names.contains(name))
        {
            return Err(invalid(
                "naabum8",
                format!("hostname {name:?} with id {id} is not in NaabuM8's hostname table"),
            ));
        }
        if names.is_empty() {
            let which = match selection {
                HostnameSelection::Domain(id) => format!("domain {id} has"),
                _ => "NaabuM8's hostname table has".into(),
            };
            return Err(invalid("naabum8", format!("{which} no enabled hostnames")));
        }
        Ok(names)
    }

    pub async fn get(&self, id: Uuid) -> Result<ScanRecord, ScanError> {
        self.store.get_scan(id).await?.ok_or_else(|| ScanError::NotFound(format!("scan {id} not found")))
    }

    pub async fn list(&self, state: Option<ScanState>, page: Page<Uuid>) -> Result<Paged<ScanRecord, Uuid>, ScanError> {
        Ok(self.store.list_scans(state, page).await?)
    }

    /// Cancelling a cancelled scan returns it unchanged; a finished one
    /// cannot be cancelled.
    pub async fn cancel(&self, id: Uuid) -> Result<ScanRecord, ScanError> {
        if let Some(scan) = self.store.cancel_scan(id).await? {
            tracing::info!(scan_id = %id, "scan cancelled");
            return Ok(scan);
        }
        let scan = self.get(id).await?;
        match scan.state {
            ScanState::Cancelled => Ok(scan),
            state => Err(ScanError::FailedPrecondition(format!("scan {id} is already {}", state.as_str()))),
        }
    }
}

/// Resolves the hostnames among `specs` through the system resolver, a
/// bounded number at a time, keeping the name on each address.
/// What a hostname that does not resolve does to its scan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Unresolved {
    /// Refuses it, naming the hostname.
    Refuse,
    /// Leaves the name out (logged).
    Skip,
}

/// Which of a name's addresses a scan takes.
#[derive(Clone, Copy, Debug)]
struct Pick {
    version: IpVersion,
    /// Every address, or the first of each family (in the resolver's order).
    all: bool,
}

impl Pick {
    fn apply(self, addrs: Vec<IpAddr>) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = Vec::new();
        for ip in addrs.into_iter().map(portfleet_core::canonical_ip).filter(|ip| self.version.admits(*ip)) {
            if self.all || !out.iter().any(|o| o.is_ipv4() == ip.is_ipv4()) {
                out.push(ip);
            }
        }
        out
    }
}

async fn resolve(
    specs: &[(TargetSpec, String)],
    timeout: Duration,
    lookups: &Semaphore,
    unresolved: Unresolved,
    pick: Pick,
) -> Result<Vec<ResolvedTarget>, ScanError> {
    let mut out: Vec<ResolvedTarget> = specs
        .iter()
        .filter_map(|(spec, _)| spec.range())
        .map(|range| ResolvedTarget { range, hostname: None })
        .collect();
    let mut names: Vec<(String, String)> = specs
        .iter()
        .filter_map(|(spec, field)| match spec {
            TargetSpec::Hostname(h) => Some((h.clone(), field.clone())),
            _ => None,
        })
        .collect();
    names.sort_unstable();
    names.dedup_by(|a, b| a.0 == b.0);
    let resolved: Vec<(String, Vec<IpAddr>)> = stream::iter(names)
        .map(|(host, field)| async move {
            let _permit = lookups.acquire().await.map_err(|_| StoreError::Cancelled)?;
            let lookup = tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), 0)))
                .await
                .map(|r| r.map(|addrs| addrs.map(|a| a.ip()).collect::<Vec<IpAddr>>()));
            let failure = match lookup.map(|r| r.map(|addrs| pick.apply(addrs))) {
                Ok(Ok(addrs)) if !addrs.is_empty() => return Ok((host, addrs)),
                Ok(Ok(_)) => format!("hostname {host:?} has no {}", pick.version.describe()),
                Ok(Err(e)) => format!("hostname {host:?} does not resolve: {e}"),
                Err(_) => format!("hostname {host:?} did not resolve within {timeout:?}"),
            };
            match unresolved {
                Unresolved::Refuse => Err(invalid(field, failure)),
                Unresolved::Skip => {
                    tracing::info!(reason = %failure, "hostname skipped");
                    Ok((host, Vec::new()))
                }
            }
        })
        .buffer_unordered(32)
        .try_collect()
        .await?;
    for (host, mut addrs) in resolved {
        addrs.sort_unstable();
        addrs.dedup();
        out.extend(
            addrs.into_iter().map(|ip| ResolvedTarget {
                range: portfleet_core::AddrRange::single(ip),
                hostname: Some(host.clone()),
            }),
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(targets: &[&str], ports: &str) -> ScanRequestInput {
        ScanRequestInput {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            ports: ports.into(),
            ..Default::default()
        }
    }

    #[test]
    fn fills_defaults() {
        let req = input(&["10.0.0.0/24"], "").validate(&ScanLimits::default()).unwrap();
        assert_eq!(req.ports.len(), 100);
        assert_eq!(req.rate, 1000);
        assert_eq!(req.retries, 1);
        assert_eq!(req.scan_type, ScanType::Syn);
        assert!(req.identify);
        assert_eq!(req.port_threshold, DEFAULT_PORT_THRESHOLD);
    }

    /// Identification settings at their defaults leave the fingerprint as
    /// it was before they existed (stored requests still match their
    /// retries); any other value is a different request.
    #[test]
    fn identification_settings_are_part_of_the_request() {
        let limits = ScanLimits::default();
        let plain = input(&["192.0.2.1"], "80").validate(&limits).unwrap();
        let mut explicit = input(&["192.0.2.1"], "80");
        explicit.identify = Some(true);
        explicit.port_threshold = Some(DEFAULT_PORT_THRESHOLD);
        assert_eq!(explicit.validate(&limits).unwrap().fingerprint(), plain.fingerprint());
        let mut off = input(&["192.0.2.1"], "80");
        off.identify = Some(false);
        assert_ne!(off.validate(&limits).unwrap().fingerprint(), plain.fingerprint());
        let mut strict = input(&["192.0.2.1"], "80");
        strict.port_threshold = Some(5);
        assert_ne!(strict.validate(&limits).unwrap().fingerprint(), plain.fingerprint());
        let mut huge = input(&["192.0.2.1"], "80");
        huge.port_threshold = Some(70_000);
        assert_eq!(
            huge.validate(&limits).unwrap_err().to_string(),
            "port_threshold: 70000 exceeds the number of ports, 65535"
        );
    }

    #[test]
    fn names_the_bad_field() {
        let limits = ScanLimits::default();
        let err = |i: ScanRequestInput| i.validate(&limits).unwrap_err().to_string();
        assert_eq!(
            err(input(&["10.0.0.1", "10.0.0.300"], "80")),
            "targets[1]: \"10.0.0.300\": not a valid IPv4 address"
        );
        assert_eq!(err(input(&["10.0.0.1"], "80,x")), "ports: \"80,x\": \"x\" is not a port number");
        assert_eq!(err(input(&[], "80")), "targets: give at least one target or a target_group");
        let mut i = input(&["10.0.0.1"], "80");
        i.retries = Some(11);
        assert_eq!(err(i), "retries: 11 exceeds the maximum of 10");
        let mut i = input(&["10.0.0.1"], "80");
        i.labels.insert("bad key".into(), "v".into());
        let e = err(i);
        assert!(e.starts_with("labels: key \"bad key\""), "{e}");
        for bad in ["a\0b", "line\r\nforged", "\u{1b}[2J"] {
            let mut i = input(&["10.0.0.1"], "80");
            i.request_id = bad.into();
            assert!(err(i).starts_with("request_id: contains a control character"));
            let mut i = input(&[], "80");
            i.target_group = bad.into();
            assert!(err(i).starts_with("target_group: contains a control character"));
            let mut i = input(&["10.0.0.1"], "80");
            i.labels.insert("k".into(), bad.into());
            assert!(err(i).starts_with("labels: value of k: contains a control character"));
            let mut i = input(&["10.0.0.1"], "80");
            i.agent_selector.insert("k".into(), bad.into());
            assert!(err(i).starts_with("agent_selector: value of k"));
            let mut i = input(&["10.0.0.1"], "80");
            i.correlation_id = Some(bad.into());
            assert!(err(i).starts_with("correlation_id: contains a control character"));
        }
    }
}
