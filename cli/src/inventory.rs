//! The network memory (docs/inventory.md): `hosts` lists what any scan
//! found open, `host` shows one address's ports and history, `changes`
//! lists what opened, closed or changed service between scans, and `diff`
//! compares two scans. All of it is the controller's; this module asks and
//! prints.
//!
//! Lists stream page by page ([`Listing`]): a table whose first page fixes
//! the columns, or one JSON object / CSV record per line. JSON and CSV give
//! times in RFC 3339 with nanoseconds (as `Found`'s `timestamp`), JSON
//! under names without the wire's `_time` suffix and with services in the
//! shared [`Service`] schema.

use std::{
    io::{self, BufWriter, Write},
    time::SystemTime,
};

use clap::Args;
use portfleet_core::Service;
use portfleet_proto::{auth::ApiClient, v1 as pb};
use serde::Serialize;

use crate::{
    PAGE,
    args::{self, ChangeKindArg, Limit, ListFormat, ViewFormat},
    show::{self, Table},
    status,
};

#[derive(Args, Debug)]
pub struct HostsArgs {
    /// Only addresses in this address or CIDR block.
    #[arg(long)]
    pub cidr: Option<String>,
    /// Only hosts resolved from this name (exact, any case).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Only hosts found by scans of this target group.
    #[arg(long)]
    pub group: Option<String>,
    /// Only hosts with this port open now.
    #[arg(long, value_parser = args::port)]
    pub port: Option<u32>,
    /// Only hosts seen with a port open at or after this time: RFC 3339 in
    /// UTC (2024-05-01T00:00:00Z) or a duration ago (24h, 7d).
    #[arg(long, value_parser = args::since)]
    pub since: Option<SystemTime>,
    /// Output format: a table, JSON Lines or CSV.
    #[arg(long, value_enum, default_value_t = ListFormat::Text)]
    pub format: ListFormat,
    /// At most this many hosts (0: all of them).
    #[arg(long, default_value_t = 0)]
    pub limit: u32,
}

#[derive(Args, Debug)]
pub struct ChangesArgs {
    /// Only changes observed at or after this time: RFC 3339 in UTC
    /// (2024-05-01T00:00:00Z) or a duration ago (24h, 7d).
    #[arg(long, value_parser = args::since)]
    pub since: Option<SystemTime>,
    /// Only changes found by scans created after this scan.
    #[arg(long = "after-scan", value_name = "ID")]
    pub after_scan: Option<String>,
    /// Only changes found by this scan.
    #[arg(long, value_name = "ID")]
    pub scan: Option<String>,
    /// Only addresses in this address or CIDR block.
    #[arg(long)]
    pub cidr: Option<String>,
    /// Only this port.
    #[arg(long, value_parser = args::port)]
    pub port: Option<u32>,
    /// Only changes found by scans of this target group.
    #[arg(long)]
    pub group: Option<String>,
    /// Only changes of this kind.
    #[arg(long, value_enum)]
    pub kind: Option<ChangeKindArg>,
    /// Output format: a table, JSON Lines or CSV.
    #[arg(long, value_enum, default_value_t = ListFormat::Text)]
    pub format: ListFormat,
    /// At most this many changes, newest first (0: all of them).
    #[arg(long, default_value_t = 100)]
    pub limit: u32,
}

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The earlier scan.
    pub a: String,
    /// The later scan.
    pub b: String,
    /// Output format: text, or JSON Lines (a line of counts, then a line
    /// per entry, each with its `kind`).
    #[arg(long, value_enum, default_value_t = ViewFormat::Text)]
    pub format: ViewFormat,
}

/// Something a list prints, in each of its formats.
trait Item {
    const COLUMNS: &'static [&'static str];
    const CSV: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
    fn csv(&self) -> Vec<String>;
    fn json(&self) -> String;
}

/// A list printed page by page in one format; `--no-headers` drops the
/// table's and the CSV's header row.
struct Listing {
    format: ListFormat,
    table: Table,
    headers: bool,
    rows: usize,
}

impl Listing {
    fn new<T: Item>(format: ListFormat, headers: bool) -> Self {
        Self { format, table: Table::new(T::COLUMNS, headers), headers, rows: 0 }
    }

    fn page<T: Item>(&mut self, out: &mut impl Write, items: &[T]) -> io::Result<()> {
        if items.is_empty() {
            return Ok(());
        }
        match self.format {
            ListFormat::Text => self.table.page(out, &items.iter().map(T::cells).collect::<Vec<_>>())?,
            ListFormat::Jsonl => items.iter().try_for_each(|i| writeln!(out, "{}", i.json()))?,
            ListFormat::Csv => {
                if self.rows == 0 && self.headers {
                    writeln!(out, "{}", show::csv_record(T::CSV))?;
                }
                items.iter().try_for_each(|i| writeln!(out, "{}", show::csv_record(&i.csv())))?;
            }
        }
        self.rows += items.len();
        Ok(())
    }
}

/// A JSON line; a struct of plain fields always serialises.
fn json_line(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn service(s: Option<&pb::Service>) -> Option<Service> {
    s.cloned().map(Service::from)
}

/// The protocol of every port: TCP is the only one (and what an unset
/// field means).
const TCP: &str = "tcp";

#[derive(Serialize)]
struct HostJson<'a> {
    ip: &'a str,
    hostnames: &'a [String],
    target_groups: &'a [String],
    open_port_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_seen: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen: Option<String>,
    /// `host` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    ports: Option<Vec<PortJson<'a>>>,
    /// `host` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    changes: Option<Vec<ChangeJson<'a>>>,
}

impl<'a> HostJson<'a> {
    fn new(h: &'a pb::Host) -> Self {
        Self {
            ip: &h.ip,
            hostnames: &h.hostnames,
            target_groups: &h.target_groups,
            open_port_count: h.open_port_count,
            first_seen: show::exact_time(h.first_seen_time.as_ref()),
            last_seen: show::exact_time(h.last_seen_time.as_ref()),
            ports: None,
            changes: None,
        }
    }
}

#[derive(Serialize)]
struct PortJson<'a> {
    port: u32,
    protocol: &'static str,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_open: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_open: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_probe: Option<String>,
    #[serde(skip_serializing_if = "str::is_empty")]
    last_scan_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    changed: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service: Option<Service>,
}

impl<'a> PortJson<'a> {
    fn new(p: &'a pb::HostPort) -> Self {
        Self {
            port: p.port,
            protocol: TCP,
            state: show::port_state_name(p.state),
            first_open: show::exact_time(p.first_open_time.as_ref()),
            last_open: show::exact_time(p.last_open_time.as_ref()),
            last_probe: show::exact_time(p.last_probe_time.as_ref()),
            last_scan_id: &p.last_scan_id,
            changed: show::exact_time(p.change_time.as_ref()),
            service: service(p.service.as_ref()),
        }
    }
}

#[derive(Serialize)]
struct ChangeJson<'a> {
    id: &'a str,
    kind: &'static str,
    ip: &'a str,
    port: u32,
    protocol: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    time: Option<String>,
    scan_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    previous_scan_id: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    hostname: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_before: Option<Service>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_after: Option<Service>,
}

impl<'a> ChangeJson<'a> {
    fn new(c: &'a pb::Change) -> Self {
        Self {
            id: &c.id,
            kind: show::change_kind_name(c.kind),
            ip: &c.ip,
            port: c.port,
            protocol: TCP,
            time: show::exact_time(c.time.as_ref()),
            scan_id: &c.scan_id,
            previous_scan_id: &c.previous_scan_id,
            hostname: &c.hostname,
            service_before: service(c.service_before.as_ref()),
            service_after: service(c.service_after.as_ref()),
        }
    }
}

/// Names in one cell or field.
fn names(v: &[String]) -> String {
    show::or_dash(&v.join(","))
}

impl Item for pb::Host {
    const COLUMNS: &'static [&'static str] = &["IP", "HOSTNAMES", "OPEN", "FIRST SEEN", "LAST SEEN"];
    const CSV: &'static [&'static str] = &["ip", "hostnames", "target_groups", "open_ports", "first_seen", "last_seen"];

    fn cells(&self) -> Vec<String> {
        vec![
            show::clean(&self.ip),
            names(&self.hostnames),
            self.open_port_count.to_string(),
            show::time(self.first_seen_time.as_ref()),
            show::time(self.last_seen_time.as_ref()),
        ]
    }

    /// Lists inside a field are `;`-separated.
    fn csv(&self) -> Vec<String> {
        vec![
            show::clean(&self.ip),
            show::clean(&self.hostnames.join(";")),
            show::clean(&self.target_groups.join(";")),
            self.open_port_count.to_string(),
            show::exact_time(self.first_seen_time.as_ref()).unwrap_or_default(),
            show::exact_time(self.last_seen_time.as_ref()).unwrap_or_default(),
        ]
    }

    fn json(&self) -> String {
        json_line(&HostJson::new(self))
    }
}

/// What answered before and after: "ssh OpenSSH 8.9 -> ssh OpenSSH 9.2",
/// "-" for a side nothing identified; "-" when neither was.
fn service_change(c: &pb::Change) -> String {
    if c.service_before.is_none() && c.service_after.is_none() {
        return "-".into();
    }
    format!("{} -> {}", show::service(c.service_before.as_ref()), show::service(c.service_after.as_ref()))
}

impl Item for pb::Change {
    const COLUMNS: &'static [&'static str] = &["TIME", "KIND", "ADDRESS", "SCAN", "PREVIOUS", "SERVICE"];
    const CSV: &'static [&'static str] = &[
        "time",
        "kind",
        "ip",
        "port",
        "protocol",
        "hostname",
        "scan_id",
        "previous_scan_id",
        "service_before",
        "service_after",
    ];

    fn cells(&self) -> Vec<String> {
        vec![
            show::time(self.time.as_ref()),
            show::change_kind_name(self.kind).into(),
            show::endpoint(&self.ip, self.port),
            show::or_dash(&self.scan_id),
            show::or_dash(&self.previous_scan_id),
            service_change(self),
        ]
    }

    fn csv(&self) -> Vec<String> {
        let summary = |s: Option<&pb::Service>| s.map(|s| show::service(Some(s))).unwrap_or_default();
        vec![
            show::exact_time(self.time.as_ref()).unwrap_or_default(),
            show::change_kind_name(self.kind).into(),
            show::clean(&self.ip),
            self.port.to_string(),
            TCP.into(),
            show::clean(&self.hostname),
            show::clean(&self.scan_id),
            show::clean(&self.previous_scan_id),
            summary(self.service_before.as_ref()),
            summary(self.service_after.as_ref()),
        ]
    }

    fn json(&self) -> String {
        json_line(&ChangeJson::new(self))
    }
}

/// Says on stderr that `--limit` stopped the list while the controller
/// had another page (which may be empty: a full page has a next token).
fn say_cut(limit: Limit, more: bool, shown: usize, noun: &str) {
    if limit.reached() && more {
        eprintln!("stopped at --limit {shown} {noun}; there may be more (--limit 0 lists them all)");
    }
}

/// `hosts`: every host that passes the filters, by address, page by page.
pub async fn hosts(c: &mut ApiClient, a: HostsArgs, headers: bool) -> Result<i32, String> {
    let mut out = BufWriter::new(io::stdout().lock());
    let mut list = Listing::new::<pb::Host>(a.format, headers);
    let mut limit = Limit::new(a.limit);
    let mut token = String::new();
    loop {
        let request = pb::ListHostsRequest {
            cidr: a.cidr.clone().unwrap_or_default(),
            hostname: a.hostname.clone().unwrap_or_default(),
            target_group: a.group.clone(),
            open_port: a.port,
            seen_since: a.since.map(args::timestamp),
            page_size: limit.page_size(PAGE),
            page_token: token,
        };
        let page = c.list_hosts(request).await.map_err(status)?.into_inner();
        let more = !page.next_page_token.is_empty();
        let hosts = limit.take(page.hosts);
        // A write error is stdout's reader leaving (`| head`): done, quietly.
        if list.page(&mut out, &hosts).and_then(|()| out.flush()).is_err() || hosts.is_empty() {
            break;
        }
        if limit.reached() || !more {
            say_cut(limit, more, list.rows, "hosts");
            break;
        }
        token = page.next_page_token;
    }
    if list.rows == 0 {
        eprintln!("no hosts");
    }
    Ok(0)
}

/// `changes`: newest first, page by page, up to `--limit`.
pub async fn changes(c: &mut ApiClient, a: ChangesArgs, headers: bool) -> Result<i32, String> {
    let mut out = BufWriter::new(io::stdout().lock());
    let mut list = Listing::new::<pb::Change>(a.format, headers);
    let mut limit = Limit::new(a.limit);
    let mut token = String::new();
    loop {
        let request = pb::ListChangesRequest {
            since: a.since.map(args::timestamp),
            after_scan_id: a.after_scan.clone().unwrap_or_default(),
            scan_id: a.scan.clone().unwrap_or_default(),
            cidr: a.cidr.clone().unwrap_or_default(),
            port: a.port,
            target_group: a.group.clone(),
            kind: a.kind.map_or(0, |k| k.to_pb() as i32),
            page_size: limit.page_size(PAGE),
            page_token: token,
        };
        let page = c.list_changes(request).await.map_err(status)?.into_inner();
        let more = !page.next_page_token.is_empty();
        let changes = limit.take(page.changes);
        if list.page(&mut out, &changes).and_then(|()| out.flush()).is_err() || changes.is_empty() {
            break;
        }
        if limit.reached() || !more {
            say_cut(limit, more, list.rows, "changes");
            break;
        }
        token = page.next_page_token;
    }
    if list.rows == 0 {
        eprintln!("no changes");
    }
    Ok(0)
}

const PORT_COLUMNS: &[&str] = &["PORT", "STATE", "SERVICE", "FIRST OPEN", "LAST OPEN", "LAST PROBE", "LAST SCAN"];

fn port_row(p: &pb::HostPort) -> Vec<String> {
    vec![
        p.port.to_string(),
        show::port_state_name(p.state).into(),
        show::service(p.service.as_ref()),
        show::time(p.first_open_time.as_ref()),
        show::time(p.last_open_time.as_ref()),
        show::time(p.last_probe_time.as_ref()),
        show::or_dash(&p.last_scan_id),
    ]
}

/// `host`: one address: its fields, its ports, its latest changes.
pub async fn host(c: &mut ApiClient, ip: String, format: ViewFormat, headers: bool) -> Result<i32, String> {
    let h = c.get_host(pb::GetHostRequest { ip }).await.map_err(status)?.into_inner();
    let mut out = BufWriter::new(io::stdout().lock());
    let written = match format {
        ViewFormat::Jsonl => writeln!(out, "{}", host_json(&h)),
        ViewFormat::Text => host_text(&mut out, &h, headers),
    };
    let _ = written.and_then(|()| out.flush());
    Ok(0)
}

fn host_json(h: &pb::Host) -> String {
    let json = HostJson {
        ports: Some(h.ports.iter().map(PortJson::new).collect()),
        changes: Some(h.changes.iter().map(ChangeJson::new).collect()),
        ..HostJson::new(h)
    };
    json_line(&json)
}

fn host_text(out: &mut impl Write, h: &pb::Host, headers: bool) -> io::Result<()> {
    let ip = show::clean(&h.ip);
    let changes = match h.changes.len() {
        0 => "none".to_string(),
        n => format!("the latest {n} below (`portfleet changes --cidr {ip}` lists them all)"),
    };
    show::fields(
        out,
        &[
            ("ip", ip.clone()),
            ("hostnames", names(&h.hostnames)),
            ("target groups", names(&h.target_groups)),
            ("open ports", h.open_port_count.to_string()),
            ("first seen", show::time(h.first_seen_time.as_ref())),
            ("last seen", show::time(h.last_seen_time.as_ref())),
            ("changes", changes),
        ],
    )?;
    if !h.ports.is_empty() {
        writeln!(out)?;
        Table::new(PORT_COLUMNS, headers).page(out, &h.ports.iter().map(port_row).collect::<Vec<_>>())?;
    }
    if !h.changes.is_empty() {
        writeln!(out)?;
        Table::new(<pb::Change as Item>::COLUMNS, headers)
            .page(out, &h.changes.iter().map(Item::cells).collect::<Vec<_>>())?;
    }
    Ok(())
}

/// The largest page of diff entries the controller serves.
const DIFF_PAGE: u32 = 10_000;

/// `diff`: the counts, then every entry, page by page.
pub async fn diff(c: &mut ApiClient, a: DiffArgs) -> Result<i32, String> {
    let mut out = BufWriter::new(io::stdout().lock());
    let mut token = String::new();
    let mut first = true;
    loop {
        let request = pb::DiffScansRequest { a: a.a.clone(), b: a.b.clone(), page_size: DIFF_PAGE, page_token: token };
        let page = c.diff_scans(request).await.map_err(status)?.into_inner();
        let written = if first { diff_counts(&mut out, &a, &page) } else { Ok(()) }
            .and_then(|()| page.entries.iter().try_for_each(|e| writeln!(out, "{}", diff_entry(e, a.format))))
            .and_then(|()| out.flush());
        first = false;
        if written.is_err() || page.next_page_token.is_empty() || page.entries.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    Ok(0)
}

#[derive(Serialize)]
struct DiffCounts<'a> {
    kind: &'static str,
    a: &'a str,
    b: &'a str,
    opened: u64,
    closed: u64,
    unchanged: u64,
    only_a: u64,
    only_b: u64,
    covered_by_a: u64,
    covered_by_b: u64,
}

fn diff_counts(out: &mut impl Write, a: &DiffArgs, d: &pb::DiffScansResponse) -> io::Result<()> {
    if a.format == ViewFormat::Jsonl {
        let counts = DiffCounts {
            kind: "counts",
            a: &a.a,
            b: &a.b,
            opened: d.opened,
            closed: d.closed,
            unchanged: d.unchanged,
            only_a: d.only_a,
            only_b: d.only_b,
            covered_by_a: d.covered_by_a,
            covered_by_b: d.covered_by_b,
        };
        return writeln!(out, "{}", json_line(&counts));
    }
    let probes = |n: u64| show::count(n, "probe");
    show::fields(
        out,
        &[
            ("A", show::clean(&a.a)),
            ("B", show::clean(&a.b)),
            ("opened", d.opened.to_string()),
            ("closed", d.closed.to_string()),
            ("unchanged", d.unchanged.to_string()),
            ("only in A", d.only_a.to_string()),
            ("only in B", d.only_b.to_string()),
            ("covered by A", probes(d.covered_by_a)),
            ("covered by B", probes(d.covered_by_b)),
        ],
    )?;
    if !d.entries.is_empty() {
        writeln!(out)?;
    }
    Ok(())
}

#[derive(Serialize)]
struct DiffJson<'a> {
    kind: &'static str,
    ip: &'a str,
    port: u32,
    protocol: &'static str,
}

/// `+ ip:port opened`, `- ip:port closed`, `? ip:port only in A`; or its
/// JSON line.
fn diff_entry(e: &pb::DiffEntry, format: ViewFormat) -> String {
    let (mark, kind, what) = match pb::DiffKind::try_from(e.kind) {
        Ok(pb::DiffKind::Opened) => ('+', "opened", "opened"),
        Ok(pb::DiffKind::Closed) => ('-', "closed", "closed"),
        Ok(pb::DiffKind::OnlyA) => ('?', "only-a", "only in A"),
        Ok(pb::DiffKind::OnlyB) => ('?', "only-b", "only in B"),
        _ => ('?', "unknown", "unknown"),
    };
    match format {
        ViewFormat::Jsonl => json_line(&DiffJson { kind, ip: &e.ip, port: e.port, protocol: TCP }),
        ViewFormat::Text => format!("{mark} {} {what}", show::endpoint(&e.ip, e.port)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn change() -> pb::Change {
        pb::Change {
            id: "c1".into(),
            kind: pb::ChangeKind::ServiceChanged as i32,
            ip: "2001:db8::1".into(),
            port: 22,
            time: at(1_700_000_000),
            scan_id: "s2".into(),
            previous_scan_id: "s1".into(),
            service_before: Some(pb::Service {
                name: "ssh".into(),
                product: "OpenSSH".into(),
                version: "8.9".into(),
                verified: true,
                ..Default::default()
            }),
            service_after: Some(pb::Service {
                name: "ssh".into(),
                product: "OpenSSH".into(),
                version: "9.2".into(),
                verified: true,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn printed<T: Item>(format: ListFormat, headers: bool, pages: &[&[T]]) -> String {
        let mut out = Vec::new();
        let mut list = Listing::new::<T>(format, headers);
        for page in pages {
            list.page(&mut out, page).unwrap();
        }
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn changes_print_newest_first_as_given_in_every_format() {
        let opened = pb::Change {
            kind: pb::ChangeKind::Opened as i32,
            ip: "192.0.2.1".into(),
            port: 80,
            service_before: None,
            service_after: None,
            previous_scan_id: String::new(),
            ..change()
        };
        let text = printed(ListFormat::Text, true, &[&[change()], std::slice::from_ref(&opened)]);
        assert_eq!(
            text,
            "TIME                  KIND             ADDRESS           SCAN  PREVIOUS  SERVICE\n\
             2023-11-14T22:13:20Z  service-changed  [2001:db8::1]:22  s2    s1        ssh OpenSSH 8.9 -> ssh OpenSSH 9.2\n\
             2023-11-14T22:13:20Z  opened           192.0.2.1:80      s2    -         -\n"
        );
        let csv = printed(ListFormat::Csv, true, &[std::slice::from_ref(&opened), std::slice::from_ref(&opened)]);
        assert_eq!(
            csv,
            "time,kind,ip,port,protocol,hostname,scan_id,previous_scan_id,service_before,service_after\n\
             2023-11-14T22:13:20.000000000Z,opened,192.0.2.1,80,tcp,,s2,,,\n\
             2023-11-14T22:13:20.000000000Z,opened,192.0.2.1,80,tcp,,s2,,,\n"
        );
        assert_eq!(
            opened.json(),
            r#"{"id":"c1","kind":"opened","ip":"192.0.2.1","port":80,"protocol":"tcp","time":"2023-11-14T22:13:20.000000000Z","scan_id":"s2"}"#
        );
        assert!(change().json().contains(
            r#""service_before":{"name":"ssh","product":"OpenSSH","version":"8.9","confidence":0,"verified":true}"#
        ));
    }

    #[test]
    fn hosts_list_with_their_names_and_counts() {
        let h = pb::Host {
            ip: "192.0.2.1".into(),
            hostnames: vec!["a.example".into(), "b.example".into()],
            target_groups: vec!["prod".into()],
            open_port_count: 3,
            first_seen_time: at(1_700_000_000),
            last_seen_time: at(1_700_086_400),
            ..Default::default()
        };
        assert_eq!(
            printed(ListFormat::Text, false, &[std::slice::from_ref(&h)]),
            "192.0.2.1  a.example,b.example  3     2023-11-14T22:13:20Z  2023-11-15T22:13:20Z\n"
        );
        assert_eq!(
            printed(ListFormat::Csv, false, &[std::slice::from_ref(&h)]),
            "192.0.2.1,a.example;b.example,prod,3,2023-11-14T22:13:20.000000000Z,2023-11-15T22:13:20.000000000Z\n"
        );
        assert_eq!(
            h.json(),
            r#"{"ip":"192.0.2.1","hostnames":["a.example","b.example"],"target_groups":["prod"],"open_port_count":3,"first_seen":"2023-11-14T22:13:20.000000000Z","last_seen":"2023-11-15T22:13:20.000000000Z"}"#
        );
    }

    #[test]
    fn a_host_shows_its_ports_and_changes() {
        let h = pb::Host {
            ip: "2001:db8::1".into(),
            open_port_count: 1,
            ports: vec![pb::HostPort {
                port: 22,
                state: pb::PortState::Open as i32,
                last_scan_id: "s2".into(),
                first_open_time: at(1_700_000_000),
                service: change().service_after,
                ..Default::default()
            }],
            changes: vec![change()],
            ..Default::default()
        };
        let mut out = Vec::new();
        host_text(&mut out, &h, true).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(
            text.contains(
                "changes:       the latest 1 below (`portfleet changes --cidr 2001:db8::1` lists them all)\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\nPORT  STATE  SERVICE          FIRST OPEN            LAST OPEN  LAST PROBE  LAST SCAN\n\
                               22    open   ssh OpenSSH 9.2  2023-11-14T22:13:20Z  -          -           s2\n"
            ),
            "{text}"
        );
        assert!(text.contains("service-changed  [2001:db8::1]:22"), "{text}");
        let json = host_json(&h);
        assert!(json.contains(r#""ports":[{"port":22,"protocol":"tcp","state":"open","first_open":"2023-11-14T22:13:20.000000000Z","last_scan_id":"s2","service":{"#), "{json}");
        assert!(json.contains(r#""changes":[{"id":"c1","kind":"service-changed""#), "{json}");
    }

    #[test]
    fn diff_entries_are_marked() {
        let e = |kind: pb::DiffKind, ip: &str| pb::DiffEntry {
            kind: kind as i32,
            ip: ip.into(),
            port: 443,
            ..Default::default()
        };
        assert_eq!(diff_entry(&e(pb::DiffKind::Opened, "192.0.2.1"), ViewFormat::Text), "+ 192.0.2.1:443 opened");
        assert_eq!(diff_entry(&e(pb::DiffKind::Closed, "2001:db8::1"), ViewFormat::Text), "- [2001:db8::1]:443 closed");
        assert_eq!(diff_entry(&e(pb::DiffKind::OnlyA, "192.0.2.1"), ViewFormat::Text), "? 192.0.2.1:443 only in A");
        assert_eq!(diff_entry(&e(pb::DiffKind::OnlyB, "192.0.2.1"), ViewFormat::Text), "? 192.0.2.1:443 only in B");
        assert_eq!(
            diff_entry(&e(pb::DiffKind::OnlyB, "192.0.2.1"), ViewFormat::Jsonl),
            r#"{"kind":"only-b","ip":"192.0.2.1","port":443,"protocol":"tcp"}"#
        );
        let d = pb::DiffScansResponse { opened: 1, covered_by_a: 1, covered_by_b: 2, ..Default::default() };
        let a = DiffArgs { a: "s1".into(), b: "s2".into(), format: ViewFormat::Text };
        let mut out = Vec::new();
        diff_counts(&mut out, &a, &d).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("A:            s1\nB:            s2\nopened:       1\n"), "{text}");
        assert!(text.contains("covered by A: 1 probe\ncovered by B: 2 probes\n"), "{text}");
    }
}
