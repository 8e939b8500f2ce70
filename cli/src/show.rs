//! How the client prints what the controller answers: aligned tables with
//! a header row, `field: value` views, counted nouns and times. Every
//! text the server sends is passed through core's `text::sanitize`, so a
//! stored name can never move the cursor or forge a line.
//!
//! Output is the same whether or not stdout is a terminal (no colour, no
//! widths taken from the terminal), so scripts can rely on the columns.

use std::{
    collections::HashMap,
    io::{self, Write},
    time::{Duration, SystemTime},
};

use portfleet_core::text;
use portfleet_proto::v1 as pb;

/// `n` and the noun, singular for one: "1 shard", "2 shards".
pub fn count(n: u64, noun: &str) -> String {
    if n == 1 { format!("1 {noun}") } else { format!("{n} {}", plural(noun)) }
}

fn plural(noun: &str) -> String {
    // The few nouns this client counts; irregular ones are spelled out.
    match noun {
        "address" => "addresses".into(),
        _ => format!("{noun}s"),
    }
}

/// Server text made safe to print (control characters become spaces).
pub fn clean(s: &str) -> String {
    text::sanitize(s, usize::MAX)
}

/// A cell or value that may be empty: "-" keeps the columns countable.
pub fn or_dash(s: &str) -> String {
    if s.is_empty() { "-".into() } else { clean(s) }
}

pub fn system_time(t: Option<&prost_types::Timestamp>) -> Option<SystemTime> {
    t.and_then(|t| SystemTime::try_from(*t).ok())
}

/// RFC 3339 in UTC to the second (sortable, the same in every locale),
/// or "-".
pub fn time(t: Option<&prost_types::Timestamp>) -> String {
    system_time(t).map_or_else(|| "-".into(), |t| humantime::format_rfc3339_seconds(t).to_string())
}

/// RFC 3339 in UTC with nanoseconds, as `Found`'s `timestamp`: the time
/// of the machine formats (JSON Lines, CSV).
pub fn exact_time(t: Option<&prost_types::Timestamp>) -> Option<String> {
    system_time(t).map(|t| humantime::format_rfc3339_nanos(t).to_string())
}

/// `ip:port` (`[v6]:port`); an address that does not parse is shown as
/// sent, cleaned.
pub fn endpoint(ip: &str, port: u32) -> String {
    match (ip.parse::<std::net::IpAddr>(), u16::try_from(port)) {
        (Ok(ip), Ok(port)) => std::net::SocketAddr::new(ip, port).to_string(),
        _ => format!("{}:{port}", clean(ip)),
    }
}

/// What answers on a port, one cell: "ssh OpenSSH 9.2p1", or "-".
pub fn service(s: Option<&pb::Service>) -> String {
    s.map_or_else(|| "-".into(), |s| or_dash(&portfleet_core::Service::from(s.clone()).summary()))
}

/// One CSV record without its line end, quoted as RFC 4180 says: a field
/// with a comma, a double quote or a line break is put in double quotes,
/// its double quotes doubled.
pub fn csv_record<S: AsRef<str>>(fields: &[S]) -> String {
    let quoted: Vec<String> = fields
        .iter()
        .map(|f| {
            let f = f.as_ref();
            if f.contains([',', '"', '\r', '\n']) { format!("\"{}\"", f.replace('"', "\"\"")) } else { f.to_string() }
        })
        .collect();
    quoted.join(",")
}

/// A duration to the second ("1h 2m 3s"); under a second is "0s".
pub fn duration(d: Duration) -> String {
    humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
}

/// A table printed page by page: the first page with rows fixes the
/// column widths (and prints the header), so a long list streams rather
/// than being held in memory. A later value wider than its column pushes
/// that row's later cells right, never into the next column.
pub struct Table {
    headers: &'static [&'static str],
    show_headers: bool,
    widths: Option<Vec<usize>>,
    rows: usize,
}

impl Table {
    pub fn new(headers: &'static [&'static str], show_headers: bool) -> Self {
        Self { headers, show_headers, widths: None, rows: 0 }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn page(&mut self, out: &mut impl Write, rows: &[Vec<String>]) -> io::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let widths = match &self.widths {
            Some(w) => w.clone(),
            None => {
                let w: Vec<usize> = (0..self.headers.len())
                    .map(|i| {
                        let cells = rows.iter().map(|r| r.get(i).map_or(0, |c| c.chars().count()));
                        cells.chain([self.headers[i].len()]).max().unwrap_or(0)
                    })
                    .collect();
                if self.show_headers {
                    writeln!(out, "{}", line(self.headers, &w))?;
                }
                self.widths = Some(w.clone());
                w
            }
        };
        for r in rows {
            writeln!(out, "{}", line(r, &widths))?;
        }
        self.rows += rows.len();
        Ok(())
    }
}

/// Cells padded to their widths and two spaces apart; the last one is not
/// padded, so no line ends in blanks.
fn line<S: AsRef<str>>(cells: &[S], widths: &[usize]) -> String {
    let mut s = String::new();
    let mut owed = 0;
    for (i, c) in cells.iter().enumerate() {
        let c = c.as_ref();
        if i > 0 {
            s.push_str(&" ".repeat(owed + 2));
        }
        s.push_str(c);
        owed = widths.get(i).copied().unwrap_or(0).saturating_sub(c.chars().count());
    }
    s
}

pub fn state_name(state: i32) -> &'static str {
    match pb::ScanState::try_from(state) {
        Ok(pb::ScanState::Pending) => "pending",
        Ok(pb::ScanState::Running) => "running",
        Ok(pb::ScanState::Completed) => "completed",
        Ok(pb::ScanState::Cancelled) => "cancelled",
        Ok(pb::ScanState::Failed) => "failed",
        _ => "unknown",
    }
}

pub fn port_state_name(state: i32) -> &'static str {
    match pb::PortState::try_from(state) {
        Ok(pb::PortState::Open) => "open",
        Ok(pb::PortState::Closed) => "closed",
        Ok(pb::PortState::Filtered) => "filtered",
        _ => "unknown",
    }
}

/// As `changes --kind` spells it.
pub fn change_kind_name(kind: i32) -> &'static str {
    match pb::ChangeKind::try_from(kind) {
        Ok(pb::ChangeKind::Opened) => "opened",
        Ok(pb::ChangeKind::Closed) => "closed",
        Ok(pb::ChangeKind::ServiceChanged) => "service-changed",
        _ => "unknown",
    }
}

pub fn agent_state_name(state: i32) -> &'static str {
    match pb::AgentState::try_from(state) {
        Ok(pb::AgentState::Connected) => "connected",
        Ok(pb::AgentState::Draining) => "draining",
        Ok(pb::AgentState::Gone) => "gone",
        _ => "unknown",
    }
}

/// `k=v,k=v` in key order, or "-".
pub fn labels(map: &HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    or_dash(&pairs.join(","))
}

/// "done/planned (pct%)".
pub fn progress(s: &pb::Scan) -> String {
    let pct = if s.probes_planned == 0 { 100.0 } else { s.probes_done as f64 * 100.0 / s.probes_planned as f64 };
    format!("{}/{} ({:.1}%)", s.probes_done, s.probes_planned, pct.min(100.0))
}

/// At most this many targets are listed by `get` (a scan may name tens of
/// thousands); the rest are counted.
const TARGETS_SHOWN: usize = 50;

fn targets(r: &pb::CreateScanRequest) -> String {
    let shown: Vec<String> = r.targets.iter().take(TARGETS_SHOWN).map(|t| clean(t)).collect();
    let mut s = shown.join(", ");
    if r.targets.len() > TARGETS_SHOWN {
        s += &format!(" (and {} more)", r.targets.len() - TARGETS_SHOWN);
    }
    or_dash(&s)
}

/// How long the scan ran (or has run so far, by this host's clock).
fn ran_for(s: &pb::Scan, now: SystemTime) -> String {
    let Some(start) = system_time(s.start_time.as_ref()) else { return "-".into() };
    match system_time(s.end_time.as_ref()) {
        Some(end) => duration(end.duration_since(start).unwrap_or_default()),
        None => format!("{} so far", duration(now.duration_since(start).unwrap_or_default())),
    }
}

/// `get`: the whole scan, one `field: value` per line, every field always
/// present ("-" when unset) so a script can pick lines by name.
pub fn scan_fields(s: &pb::Scan, now: SystemTime) -> Vec<(&'static str, String)> {
    let r = s.request.clone().unwrap_or_default();
    let scan_type = match pb::ScanType::try_from(r.scan_type) {
        Ok(pb::ScanType::Connect) => "connect",
        Ok(pb::ScanType::Syn) if r.allow_connect_fallback => "syn (connect where agents lack raw sockets)",
        Ok(pb::ScanType::Syn) => "syn",
        _ => "unknown",
    };
    let eta = match system_time(s.eta.as_ref()) {
        Some(eta) => duration(eta.duration_since(now).unwrap_or_default()),
        None => "-".into(),
    };
    vec![
        ("id", s.id.clone()),
        ("state", state_name(s.state).into()),
        ("targets", targets(&r)),
        ("target group", or_dash(&r.target_group)),
        ("addresses", s.address_count.to_string()),
        ("ports", format!("{} ({})", or_dash(&r.ports), count(u64::from(s.port_count), "port"))),
        ("type", scan_type.into()),
        ("rate", format!("{} probes/s", r.rate)),
        ("retries", r.retries.map_or_else(|| "-".into(), |n| n.to_string())),
        ("request id", or_dash(&r.request_id)),
        ("labels", labels(&r.labels)),
        ("agent selector", labels(&r.agent_selector)),
        ("exclude", if r.exclude.is_empty() { "-".into() } else { clean(&r.exclude.join(",")) }),
        ("exclude ports", or_dash(&r.exclude_ports)),
        ("schedule", or_dash(&s.schedule_id)),
        (
            "deadline",
            match &r.deadline {
                None => "-".into(),
                Some(t) if s.deadline_exceeded => format!("{} (exceeded: cancelled)", time(Some(t))),
                Some(t) => time(Some(t)),
            },
        ),
        ("created", time(s.create_time.as_ref())),
        ("started", time(s.start_time.as_ref())),
        ("ended", time(s.end_time.as_ref())),
        ("duration", ran_for(s, now)),
        ("probes", progress(s)),
        ("shards", count(u64::from(s.shard_count), "shard")),
        ("open ports", s.open_ports.to_string()),
        ("eta", eta),
        ("waiting reason", or_dash(&s.waiting_reason)),
        ("error", or_dash(&s.error)),
    ]
}

/// `field: value` lines with the values aligned.
pub fn fields(out: &mut impl Write, fields: &[(&str, String)]) -> io::Result<()> {
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    for (k, v) in fields {
        writeln!(out, "{:<width$} {v}", format!("{k}:"))?;
    }
    Ok(())
}

/// `scan --dry-run`: what the scan would do.
pub fn plan(out: &mut impl Write, s: &pb::Scan) -> io::Result<()> {
    let p = s.plan.clone().unwrap_or_default();
    let est = p.estimated_duration.map_or(Duration::ZERO, |d| Duration::new(d.seconds.max(0) as u64, 0));
    let mut ranges = p.address_ranges.iter().map(|r| clean(r)).collect::<Vec<_>>().join(",");
    if p.address_ranges.len() as u64 != p.address_count && p.address_ranges.len() >= 1000 {
        ranges.push_str(",...");
    }
    let resolved: Vec<String> =
        p.resolved.iter().map(|n| format!("{} -> {}", clean(&n.hostname), n.addresses.join(","))).collect();
    let cdn: Vec<String> =
        p.cdn.iter().map(|c| format!("{} ({}, {})", clean(&c.address), clean(&c.provider), c.policy)).collect();
    let agents = if p.capable_agent_count == 0 {
        "none connected".to_string()
    } else {
        format!("{} ({})", p.capable_agent_count, clean(&p.capable_agents.join(",")))
    };
    fields(
        out,
        &[
            ("verdict", if p.allowed { "allowed".into() } else { format!("refused: {}", clean(&p.policy_verdict)) }),
            ("addresses", format!("{} ({})", p.address_count, or_dash(&ranges))),
            ("resolved", if resolved.is_empty() { "-".into() } else { resolved.join("; ") }),
            ("excluded", count(p.excluded_addresses, "address")),
            ("cdn edges", if cdn.is_empty() { "-".into() } else { cdn.join("; ") }),
            ("ports", count(u64::from(s.port_count), "port")),
            ("probes", p.probes.to_string()),
            ("shards", count(u64::from(p.shard_count), "shard")),
            ("capable agents", agents),
            ("estimated", format!("at most {}", duration(est))),
        ],
    )
}

/// One line for a scan that ended or was acted on: "scan ID completed:
/// 8/8 (100.0%) probes, 2 open ports".
pub fn summary(s: &pb::Scan) -> String {
    let mut line =
        format!("scan {} {}: {} probes, {}", s.id, state_name(s.state), progress(s), count(s.open_ports, "open port"));
    if !s.error.is_empty() {
        line += &format!(", error: {}", clean(&s.error));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_singular_for_one() {
        assert_eq!(count(1, "shard"), "1 shard");
        assert_eq!(count(0, "shard"), "0 shards");
        assert_eq!(count(2, "open port"), "2 open ports");
        assert_eq!(count(3, "address"), "3 addresses");
    }

    #[test]
    fn tables_align_on_the_first_page_and_never_end_in_blanks() {
        let mut out = Vec::new();
        let mut t = Table::new(&["ID", "NAME", "STATE"], true);
        t.page(&mut out, &[]).unwrap();
        t.page(&mut out, &[vec!["1".into(), "alpha".into(), "connected".into()]]).unwrap();
        t.page(&mut out, &[vec!["22".into(), "a-much-longer-name".into(), "gone".into()]]).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ID  NAME   STATE\n1   alpha  connected\n22  a-much-longer-name  gone\n"
        );
        assert_eq!(t.rows(), 2);
        let mut out = Vec::new();
        Table::new(&["ID", "NAME"], false).page(&mut out, &[vec!["1".into(), "x".into()]]).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "1   x\n");
    }

    #[test]
    fn get_shows_every_field_even_when_unset() {
        let s = pb::Scan { id: "x".into(), state: pb::ScanState::Pending as i32, ..Default::default() };
        let f = scan_fields(&s, SystemTime::now());
        let names: Vec<&str> = f.iter().map(|(k, _)| *k).collect();
        for want in ["targets", "rate", "retries", "request id", "agent selector", "duration", "waiting reason"] {
            assert!(names.contains(&want), "{want} missing: {names:?}");
        }
        assert!(f.iter().all(|(_, v)| !v.is_empty()), "{f:?}");
        let mut out = Vec::new();
        fields(&mut out, &f[..2]).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "id:    x\nstate: pending\n");
    }

    #[test]
    fn csv_fields_are_quoted_as_rfc_4180_says() {
        assert_eq!(csv_record(&["a", "", "b c"]), "a,,b c");
        assert_eq!(
            csv_record(&["x,y", "say \"hi\"", "two\nlines", "cr\r"]),
            "\"x,y\",\"say \"\"hi\"\"\",\"two\nlines\",\"cr\r\""
        );
        assert_eq!(csv_record(&["\""]), "\"\"\"\"");
    }

    #[test]
    fn endpoints_bracket_ipv6() {
        assert_eq!(endpoint("192.0.2.1", 80), "192.0.2.1:80");
        assert_eq!(endpoint("2001:db8::1", 443), "[2001:db8::1]:443");
        assert_eq!(endpoint("bad\nip", 1), "bad ip:1");
    }

    #[test]
    fn server_text_cannot_forge_lines() {
        assert_eq!(or_dash("evil\n\u{1b}[2Jname"), "evil  [2Jname");
        assert_eq!(or_dash(""), "-");
    }
}
