//! What arrives over AMQP, turned into a [`ScanRequestInput`]: the native
//! request schema v1 (docs/amqp.md, docs/amqp-request.schema.json) and the
//! NaabuM8 envelopes that existing publishers send. Pure functions: the
//! consumer decides what to do with a message that does not parse.

use std::{cell::Cell, collections::BTreeMap};

use portfleet_core::{CdnPolicy, ScanType, labels, text};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use uuid::Uuid;

use crate::scans::{HostnameSelection, IpVersion, Origin, ScanRequestInput};

/// Why a message can never become a scan (it goes to the dead-letter
/// queue with this reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadMessage(pub String);

/// The AMQP properties a request may carry.
#[derive(Debug, Default, Clone)]
pub struct Properties<'a> {
    pub message_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub reply_to: Option<&'a str>,
}

/// The idempotency key of a message: its `request_id` field, else its
/// message id, else its correlation id, else a digest of what it says, so
/// a redelivered message always maps to the scan it created first.
fn request_id(explicit: Option<String>, props: &Properties<'_>, routing_key: &str, body: &[u8]) -> String {
    explicit
        .filter(|r| !r.is_empty())
        .or_else(|| props.message_id.filter(|m| !m.is_empty()).map(str::to_string))
        .or_else(|| props.correlation_id.filter(|c| !c.is_empty()).map(str::to_string))
        .unwrap_or_else(|| {
            let mut h = Sha256::new();
            h.update(routing_key.as_bytes());
            h.update([0]);
            h.update(body);
            let digest = h.finalize();
            let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
            format!("amqp-sha256:{hex}")
        })
}

/// A parse error for a dead-letter reason: serde's messages may quote the
/// input (an unknown field's name), so they are sanitized and cut short.
fn short(e: &serde_json::Error) -> String {
    text::sanitize(&e.to_string(), 300)
}

thread_local! {
    /// The target cap of the message being parsed on this thread (see
    /// [`Bounded`]): serde's derive has no way to hand a parameter to a
    /// field, and parsing is synchronous, so it is set around each parse.
    static MAX_TARGETS: Cell<usize> = const { Cell::new(usize::MAX) };
}

/// Parses `body` as `T` with at most `max_targets` targets: the list is
/// counted while it is read, so an oversized list is refused before it
/// is built.
fn from_json<'a, T: Deserialize<'a>>(body: &'a [u8], max_targets: usize) -> serde_json::Result<T> {
    MAX_TARGETS.with(|m| m.set(max_targets));
    let parsed = serde_json::from_slice(body);
    MAX_TARGETS.with(|m| m.set(usize::MAX));
    parsed
}

/// A list of targets that refuses to grow past the cap of the parse in
/// progress.
struct Bounded<T>(Vec<T>);

impl<T> Default for Bounded<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Bounded<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Visit<T> {
            type Value = Bounded<T>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of targets")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let max = MAX_TARGETS.with(Cell::get);
                let mut out = Vec::new();
                while let Some(item) = seq.next_element()? {
                    if out.len() == max {
                        return Err(serde::de::Error::custom(format!("more than the maximum of {max} targets")));
                    }
                    out.push(item);
                }
                Ok(Bounded(out))
            }
        }
        d.deserialize_seq(Visit(std::marker::PhantomData))
    }
}

/// Request schema v1: the fields of CreateScanRequest, plus reply routing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NativeV1 {
    #[serde(default = "v1")]
    version: u32,
    #[serde(default)]
    targets: Bounded<String>,
    #[serde(default)]
    target_group: String,
    #[serde(default)]
    ports: String,
    #[serde(default)]
    scan_type: Option<String>,
    #[serde(default)]
    rate: u32,
    #[serde(default)]
    retries: Option<u32>,
    #[serde(default)]
    request_id: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    agent_selector: BTreeMap<String, String>,
    #[serde(default)]
    allow_connect_fallback: bool,
    /// Identify open ports (default true).
    #[serde(default)]
    identify: Option<bool>,
    #[serde(default)]
    port_threshold: Option<u32>,
    /// Fair share weight, 1 to 10 (default 5).
    #[serde(default)]
    priority: Option<u32>,
    #[serde(default)]
    max_agents: u32,
    #[serde(default)]
    max_parallel_shards: u32,
    #[serde(default)]
    exclude: Bounded<String>,
    #[serde(default)]
    exclude_ports: String,
    /// 4, 6 or "both" (default both).
    #[serde(default)]
    ip_version: Option<serde_json::Value>,
    #[serde(default)]
    scan_all_ips: Option<bool>,
    /// "all", "web" or "skip" (default all).
    #[serde(default)]
    cdn_policy: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    deadline: Option<String>,
    #[serde(default)]
    reply_to: Option<String>,
    #[serde(default)]
    correlation_id: Option<String>,
}

fn v1() -> u32 {
    1
}

fn ip_version(v: Option<&serde_json::Value>) -> Result<Option<IpVersion>, BadMessage> {
    match v {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(v) if v == 4 || v == "4" => Ok(Some(IpVersion::V4)),
        Some(v) if v == 6 || v == "6" => Ok(Some(IpVersion::V6)),
        Some(v) if v == "both" => Ok(Some(IpVersion::Both)),
        Some(other) => Err(BadMessage(format!("ip_version: {other} is not 4, 6 or \"both\""))),
    }
}

fn scan_type(s: Option<&str>) -> Result<Option<ScanType>, BadMessage> {
    match s.map(str::to_ascii_lowercase).as_deref() {
        None | Some("") => Ok(None),
        Some("syn" | "scan_type_syn") => Ok(Some(ScanType::Syn)),
        Some("connect" | "scan_type_connect") => Ok(Some(ScanType::Connect)),
        Some(other) => Err(BadMessage(format!("scan_type: {other:?} is not syn or connect"))),
    }
}

/// A native v1 request with at most `max_targets` targets.
pub fn parse_native(
    routing_key: &str,
    body: &[u8],
    props: &Properties<'_>,
    max_targets: usize,
) -> Result<ScanRequestInput, BadMessage> {
    let msg: NativeV1 =
        from_json(body, max_targets).map_err(|e| BadMessage(format!("not a valid v1 request: {}", short(&e))))?;
    if msg.version != 1 {
        return Err(BadMessage(format!("version {} is not supported (1 is)", msg.version)));
    }
    Ok(ScanRequestInput {
        scan_type: scan_type(msg.scan_type.as_deref())?,
        request_id: request_id(msg.request_id, props, routing_key, body),
        targets: msg.targets.0,
        target_group: msg.target_group,
        ports: msg.ports,
        rate: msg.rate,
        retries: msg.retries,
        labels: msg.labels,
        agent_selector: msg.agent_selector,
        allow_connect_fallback: msg.allow_connect_fallback,
        identify: msg.identify,
        port_threshold: msg.port_threshold,
        priority: msg.priority,
        max_agents: msg.max_agents,
        max_parallel_shards: msg.max_parallel_shards,
        exclude: msg.exclude.0,
        exclude_ports: msg.exclude_ports,
        ip_version: ip_version(msg.ip_version.as_ref())?,
        scan_all_ips: msg.scan_all_ips,
        cdn_policy: msg
            .cdn_policy
            .as_deref()
            .map(CdnPolicy::parse)
            .transpose()
            .map_err(|e| BadMessage(format!("cdn_policy: {e}")))?,
        deadline: msg
            .deadline
            .as_deref()
            .map(|d| {
                chrono::DateTime::parse_from_rfc3339(d)
                    .map(|t| t.to_utc())
                    .map_err(|e| BadMessage(format!("deadline: {d:?} is not an RFC 3339 time: {e}")))
            })
            .transpose()?,
        schedule_id: None,
        naabum8: None,
        origin: Origin::Amqp,
        // The AMQP properties win over the body.
        reply_to: props.reply_to.map(str::to_string).or(msg.reply_to),
        correlation_id: props.correlation_id.map(str::to_string).or(msg.correlation_id),
        // The consumer reads the trace context from the headers.
        trace: Default::default(),
    })
}

/// NaabuM8's message envelope.
#[derive(Deserialize)]
struct Envelope {
    #[serde(default)]
    channel: Option<String>,
    /// Kept unparsed until the command says what it should hold.
    #[serde(default)]
    payload: Option<Box<serde_json::value::RawValue>>,
    #[serde(default)]
    source: Option<String>,
}

#[derive(Deserialize)]
struct PostScan {
    target: Bounded<NamedTarget>,
}

#[derive(Deserialize)]
struct NamedTarget {
    /// A `cptm8hostname` id: a UUID where NaabuM8's table is read, kept
    /// unparsed otherwise (it is not used then).
    #[serde(default)]
    id: serde_json::Value,
    name: String,
}

/// How NaabuM8-format scans run: NaabuM8 carried no ports or rate.
#[derive(Clone, Debug)]
pub struct NaabuDefaults {
    pub ports: String,
    pub rate: u32,
    /// Hostnames come from NaabuM8's own table (`--naabum8-database-url`),
    /// not from portfleet's stored targets.
    pub hostname_table: bool,
}

/// The routing key is the command:
/// - `cptm8.naabum8.get.scan`: every enabled target;
/// - `cptm8.naabum8.get.scan/domain/<id>`: the enabled targets of group `<id>`;
/// - `cptm8.naabum8.post.scan` with `{"target":[{"id":..,"name":..}]}`: those names.
pub fn parse_naabum8(
    routing_key: &str,
    body: &[u8],
    props: &Properties<'_>,
    defaults: &NaabuDefaults,
    max_targets: usize,
) -> Result<ScanRequestInput, BadMessage> {
    let env: Envelope =
        from_json(body, max_targets).map_err(|e| BadMessage(format!("not a NaabuM8 envelope: {}", short(&e))))?;
    // The delivery's routing key is the command; the envelope repeats it.
    let command = if routing_key.starts_with("cptm8.naabum8.") {
        routing_key
    } else {
        env.channel.as_deref().unwrap_or(routing_key)
    };
    let mut input = ScanRequestInput {
        ports: defaults.ports.clone(),
        rate: defaults.rate,
        origin: Origin::NaabuM8,
        // As NaabuM8 ran naabu: IPv4 only, the first address of each name,
        // CDN edges on 80 and 443 only (-ec).
        ip_version: Some(IpVersion::V4),
        scan_all_ips: Some(false),
        cdn_policy: Some(CdnPolicy::WebPorts),
        request_id: request_id(None, props, routing_key, body),
        reply_to: props.reply_to.map(str::to_string),
        correlation_id: props.correlation_id.map(str::to_string),
        ..Default::default()
    };
    // Informational labels: made storable rather than refused.
    input.labels.insert("naabum8.command".into(), text::sanitize(command, labels::MAX_VALUE));
    if let Some(source) = env.source.filter(|s| !s.is_empty()) {
        input.labels.insert("naabum8.source".into(), text::sanitize(&source, labels::MAX_VALUE));
    }
    let table = defaults.hostname_table;
    if command == "cptm8.naabum8.get.scan" {
        if table {
            input.naabum8 = Some(HostnameSelection::All);
        } else {
            input.target_group = "*".into();
        }
    } else if let Some(group) = command.strip_prefix("cptm8.naabum8.get.scan/domain/") {
        if group.is_empty() {
            return Err(BadMessage(format!("{command}: no domain id")));
        }
        if table {
            // NaabuM8 answered 400 to an id that is not a UUID.
            let id = Uuid::parse_str(group)
                .map_err(|_| BadMessage(format!("{command}: the domain id {group:?} is not a UUID")))?;
            input.naabum8 = Some(HostnameSelection::Domain(id));
        } else {
            input.target_group = group.to_string();
        }
    } else if command == "cptm8.naabum8.post.scan" {
        let payload = env.payload.as_deref().map_or("null", serde_json::value::RawValue::get);
        let post: PostScan = from_json(payload.as_bytes(), max_targets).map_err(|e| {
            BadMessage(format!("{command}: payload is not {{\"target\":[{{\"id\":..,\"name\":..}}]}}: {}", short(&e)))
        })?;
        if post.target.0.is_empty() {
            return Err(BadMessage(format!("{command}: no targets")));
        }
        if table {
            let pairs = post
                .target
                .0
                .into_iter()
                .map(|t| match t.id.as_str().and_then(|id| Uuid::parse_str(id).ok()) {
                    Some(id) => Ok((id, t.name)),
                    None => Err(BadMessage(format!("{command}: target {:?} has no UUID id", t.name))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            input.naabum8 = Some(HostnameSelection::Named(pairs));
        } else {
            input.targets = post.target.0.into_iter().map(|t| t.name).collect();
        }
    } else {
        return Err(BadMessage(format!("unknown NaabuM8 command {command:?}")));
    }
    Ok(input)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 100_000;

    fn props() -> Properties<'static> {
        Properties { message_id: Some("m-1"), correlation_id: Some("c-1"), reply_to: Some("replies") }
    }

    #[test]
    fn native_requests_parse_with_defaults_and_properties() {
        let body = br#"{"targets":["10.0.0.0/24"],"ports":"80,443","scan_type":"connect","rate":500,
                        "labels":{"team":"red"},"reply_to":"ignored"}"#;
        let r = parse_native("scan.request", body, &props(), MAX).unwrap();
        assert_eq!(r.targets, ["10.0.0.0/24"]);
        assert_eq!(r.scan_type, Some(ScanType::Connect));
        assert_eq!((r.rate, r.request_id.as_str()), (500, "m-1"));
        assert_eq!(r.reply_to.as_deref(), Some("replies"));
        assert_eq!(r.origin, Origin::Amqp);
        let explicit = parse_native("k", br#"{"targets":["x.example"],"request_id":"job-7"}"#, &props(), MAX).unwrap();
        assert_eq!(explicit.request_id, "job-7");
    }

    #[test]
    fn the_idempotency_key_falls_back_to_a_digest() {
        let none = Properties::default();
        let a = parse_native("k", br#"{"targets":["10.0.0.1"]}"#, &none, MAX).unwrap();
        let b = parse_native("k", br#"{"targets":["10.0.0.1"]}"#, &none, MAX).unwrap();
        let c = parse_native("k", br#"{"targets":["10.0.0.2"]}"#, &none, MAX).unwrap();
        assert!(a.request_id.starts_with("amqp-sha256:"));
        assert_eq!(a.request_id, b.request_id);
        assert_ne!(a.request_id, c.request_id);
    }

    #[test]
    fn bad_native_requests_say_why() {
        for (body, needle) in [
            (&b"not json"[..], "not a valid v1 request"),
            (br#"{"targets":["10.0.0.1"],"colour":"red"}"#, "unknown field `colour`"),
            (br#"{"targets":"10.0.0.1"}"#, "invalid type"),
            (br#"{"version":2,"targets":["10.0.0.1"]}"#, "version 2"),
            (br#"{"targets":["10.0.0.1"],"scan_type":"udp"}"#, "scan_type"),
        ] {
            let err = parse_native("k", body, &props(), MAX).unwrap_err().0;
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn target_lists_are_counted_while_read() {
        let body = |n: usize| {
            let targets: Vec<String> = (0..n).map(|i| format!("10.0.{}.{}", i / 256, i % 256)).collect();
            serde_json::to_vec(&serde_json::json!({ "targets": targets })).unwrap()
        };
        assert_eq!(parse_native("k", &body(10), &props(), 10).unwrap().targets.len(), 10);
        let err = parse_native("k", &body(11), &props(), 10).unwrap_err().0;
        assert!(err.contains("more than the maximum of 10 targets"), "{err}");
        let d = NaabuDefaults { ports: "top-100".into(), rate: 1000, hostname_table: false };
        let names: Vec<_> = (0..11).map(|i| serde_json::json!({ "id": i, "name": format!("h{i}.example") })).collect();
        let env = serde_json::to_vec(&serde_json::json!({ "payload": { "target": names } })).unwrap();
        let err = parse_naabum8("cptm8.naabum8.post.scan", &env, &props(), &d, 10).unwrap_err().0;
        assert!(err.contains("more than the maximum of 10 targets"), "{err}");
        // The cap is only for the parse it was given to.
        assert_eq!(parse_native("k", &body(11), &props(), MAX).unwrap().targets.len(), 11);
    }

    #[test]
    fn errors_never_carry_control_characters() {
        let err = parse_native("k", br#"{"targets":[],"x\u001b[2J\r\ny":1}"#, &props(), MAX).unwrap_err().0;
        assert!(!err.chars().any(char::is_control), "{err:?}");
        let mut i = parse_naabum8(
            "cptm8.naabum8.get.scan",
            br#"{"payload":null,"source":"a\r\nb"}"#,
            &props(),
            &NaabuDefaults { ports: "top-100".into(), rate: 1000, hostname_table: false },
            MAX,
        )
        .unwrap();
        assert_eq!(i.labels.remove("naabum8.source").unwrap(), "a  b");
    }

    #[test]
    fn naabum8_commands_map_to_scans() {
        let d = NaabuDefaults { ports: "top-100".into(), rate: 1000, hostname_table: false };
        let env = br#"{"channel":"cptm8.naabum8.get.scan","payload":null,"timestamp":"2024-01-01T00:00:00Z","source":"orchestrator"}"#;
        let all = parse_naabum8("cptm8.naabum8.get.scan", env, &props(), &d, MAX).unwrap();
        assert_eq!(all.target_group, "*");
        assert_eq!(all.origin, Origin::NaabuM8);
        assert_eq!(all.labels["naabum8.source"], "orchestrator");
        let one = parse_naabum8("cptm8.naabum8.get.scan/domain/42", br#"{"payload":{}}"#, &props(), &d, MAX).unwrap();
        assert_eq!(one.target_group, "42");
        let post = br#"{"channel":"cptm8.naabum8.post.scan","payload":{"target":[{"id":1,"name":"a.example"},{"id":2,"name":"b.example"}]}}"#;
        let named = parse_naabum8("cptm8.naabum8.post.scan", post, &props(), &d, MAX).unwrap();
        assert_eq!(named.targets, ["a.example", "b.example"]);
        assert_eq!(named.ports, "top-100");
        for (rk, body, needle) in [
            ("cptm8.naabum8.get.scan", &b"{"[..], "not a NaabuM8 envelope"),
            ("cptm8.naabum8.post.scan", br#"{"payload":{"target":[]}}"#, "no targets"),
            ("cptm8.naabum8.post.scan", br#"{"payload":{"hosts":["x"]}}"#, "payload is not"),
            ("cptm8.naabum8.delete.all", br#"{"payload":{}}"#, "unknown NaabuM8 command"),
            ("cptm8.naabum8.get.scan/domain/", br#"{"payload":{}}"#, "no domain id"),
        ] {
            let err = parse_naabum8(rk, body, &props(), &d, MAX).unwrap_err().0;
            assert!(err.contains(needle), "{rk}: {err}");
        }
    }

    /// With NaabuM8's table, commands select from it as NaabuM8 did: a
    /// domain id and every posted id must be UUIDs (NaabuM8 answered 400).
    #[test]
    fn naabum8_commands_select_from_its_hostname_table() {
        let d = NaabuDefaults { ports: "top-100".into(), rate: 1000, hostname_table: true };
        let all = parse_naabum8("cptm8.naabum8.get.scan", br#"{"payload":null}"#, &props(), &d, MAX).unwrap();
        assert!(all.needs_lookup());
        assert_eq!((all.naabum8, all.target_group.as_str()), (Some(HostnameSelection::All), ""));
        let id = "6f1c1f4e-9a0e-4c1e-8c55-0d6f5b1b2a10";
        let one = parse_naabum8(&format!("cptm8.naabum8.get.scan/domain/{id}"), br#"{}"#, &props(), &d, MAX).unwrap();
        assert_eq!(one.naabum8, Some(HostnameSelection::Domain(id.parse().unwrap())));
        let post = format!(r#"{{"payload":{{"target":[{{"id":"{id}","name":"a.example"}}]}}}}"#);
        let named = parse_naabum8("cptm8.naabum8.post.scan", post.as_bytes(), &props(), &d, MAX).unwrap();
        assert_eq!(named.naabum8, Some(HostnameSelection::Named(vec![(id.parse().unwrap(), "a.example".into())])));
        assert!(named.targets.is_empty());
        for (rk, body, needle) in [
            ("cptm8.naabum8.get.scan/domain/42", &br#"{}"#[..], "the domain id \"42\" is not a UUID"),
            ("cptm8.naabum8.post.scan", br#"{"payload":{"target":[{"id":7,"name":"a.example"}]}}"#, "no UUID id"),
            ("cptm8.naabum8.post.scan", br#"{"payload":{"target":[{"name":"a.example"}]}}"#, "no UUID id"),
        ] {
            let err = parse_naabum8(rk, body, &props(), &d, MAX).unwrap_err().0;
            assert!(err.contains(needle), "{rk}: {err}");
        }
    }

    /// NaabuM8-format scans run as NaabuM8 ran naabu: IPv4, the first
    /// address of each name, CDN edges on web ports only.
    #[test]
    fn naabum8_requests_default_as_naabu_did() {
        let d = NaabuDefaults { ports: "top-100".into(), rate: 1000, hostname_table: false };
        let env = br#"{"channel":"cptm8.naabum8.get.scan","payload":null,"timestamp":"2024-01-01T00:00:00Z"}"#;
        let i = parse_naabum8("cptm8.naabum8.get.scan", env, &props(), &d, MAX).unwrap();
        assert_eq!(i.ip_version, Some(IpVersion::V4));
        assert_eq!(i.scan_all_ips, Some(false));
        assert_eq!(i.cdn_policy, Some(CdnPolicy::WebPorts));
        let native =
            br#"{"targets":["a.example"],"ip_version":"both","cdn_policy":"skip","deadline":"2099-01-01T00:00:00Z"}"#;
        let n = parse_native("scan.request", native, &props(), MAX).unwrap();
        assert_eq!((n.ip_version, n.cdn_policy), (Some(IpVersion::Both), Some(CdnPolicy::Skip)));
        assert!(n.deadline.is_some());
        for (bad, needle) in [
            (&br#"{"targets":["a"],"ip_version":5}"#[..], "ip_version"),
            (br#"{"targets":["a"],"cdn_policy":"most"}"#, "cdn_policy"),
            (br#"{"targets":["a"],"deadline":"tomorrow"}"#, "deadline"),
        ] {
            let err = parse_native("scan.request", bad, &props(), MAX).unwrap_err().0;
            assert!(err.contains(needle), "{err}");
        }
    }

    /// docs/amqp-request.schema.json and the parser agree: its examples
    /// parse, every property it names is accepted, and a property it does
    /// not name is refused (as its `additionalProperties: false` says).
    #[test]
    fn the_published_schema_matches_the_parser() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/amqp-request.schema.json")).unwrap();
        assert_eq!(schema["additionalProperties"], serde_json::Value::Bool(false));
        for example in schema["examples"].as_array().unwrap() {
            let body = serde_json::to_vec(example).unwrap();
            parse_native("scan.request", &body, &Properties::default(), MAX)
                .unwrap_or_else(|e| panic!("{example}: {e:?}"));
        }
        let samples = serde_json::json!({
            "version": 1, "targets": ["192.0.2.1"], "target_group": "g", "ports": "80", "scan_type": "connect",
            "rate": 5, "retries": 2, "request_id": "r", "labels": {"a": "b"}, "agent_selector": {"c": "d"},
            "allow_connect_fallback": true, "identify": false, "port_threshold": 20, "priority": 9,
            "max_agents": 2, "max_parallel_shards": 3, "reply_to": "q", "correlation_id": "c",
            "exclude": ["192.0.2.0/30"], "exclude_ports": "22", "ip_version": 4, "scan_all_ips": false,
            "cdn_policy": "web", "deadline": "2099-01-01T00:00:00Z"
        });
        let properties = schema["properties"].as_object().unwrap();
        let sample_keys: Vec<&String> = samples.as_object().unwrap().keys().collect();
        let schema_keys: Vec<&String> = properties.keys().collect();
        assert_eq!(
            sample_keys.iter().collect::<std::collections::BTreeSet<_>>(),
            schema_keys.iter().collect::<std::collections::BTreeSet<_>>()
        );
        for key in properties.keys() {
            let body = serde_json::json!({ "targets": ["192.0.2.1"], key.as_str(): samples[key] });
            let body = serde_json::to_vec(&body).unwrap();
            parse_native("scan.request", &body, &Properties::default(), MAX).unwrap_or_else(|e| panic!("{key}: {e:?}"));
        }
        let err =
            parse_native("scan.request", br#"{"targets":["192.0.2.1"],"portz":"80"}"#, &Properties::default(), MAX);
        assert!(err.unwrap_err().0.contains("portz"));
    }

    use proptest::prelude::Strategy as _;

    proptest::proptest! {
        /// Whatever arrives over AMQP, parsing returns a result (a message
        /// to dead-letter at worst), never a panic. Longer runs:
        /// PROPTEST_CASES=100000 cargo test -p portfleet-controller never_panic
        #[test]
        fn amqp_messages_never_panic(
            key in proptest::string::string_regex("(cptm8\\.naabum8\\.(get|post)\\.scan(/domain/[a-z0-9]{0,4})?|scan\\.request|.{0,20})").unwrap(),
            body in proptest::prop_oneof![
                proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
                "\\{\"(targets|payload|channel|ports|rate|version|target)\":(\\[|\"|\\{|[0-9-]{1,25}|null|true).{0,40}"
                    .prop_map(String::into_bytes),
            ],
        ) {
            let d = NaabuDefaults { ports: "top-100".into(), rate: 1000, hostname_table: false };
            let _ = parse_native(&key, &body, &props(), MAX);
            let _ = parse_naabum8(&key, &body, &props(), &d, MAX);
        }
    }
}
