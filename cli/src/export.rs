//! `results`: a scan's ports, filtered by the controller, in the format a
//! person or another tool reads: text and JSON Lines (the schema of
//! `portfleet-agent scan`, [`Found`]), CSV, nmap's XML ([`crate::nmap`])
//! and masscan's list format.
//!
//! Every format is built from the same [`Row`] (the shared [`Found`] and
//! the port's state), so the formats cannot disagree about a field. The
//! controller pages in scan order, so the pages are gathered and sorted
//! by address (IPv4 first) and port here.

use std::{
    io::{self, BufWriter, Write},
    time::{SystemTime, UNIX_EPOCH},
};

use clap::Args;
use portfleet_core::{Found, found::TextLines};
use portfleet_proto::{auth::ApiClient, v1 as pb};

use crate::{
    args::{self, PortStateArg, ResultsFormat},
    nmap, show, status, watch,
};

#[derive(Args, Debug)]
pub struct ResultsArgs {
    /// The scan's id.
    pub id: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ResultsFormat::Text)]
    pub format: ResultsFormat,
    /// Same as --format jsonl (kept for scripts).
    #[arg(long, conflicts_with = "format")]
    pub json: bool,
    /// Only addresses in this address or CIDR block.
    #[arg(long)]
    pub cidr: Option<String>,
    /// Only this port.
    #[arg(long, value_parser = args::port)]
    pub port: Option<u32>,
    /// Only results resolved from this hostname (exact, any case).
    #[arg(long)]
    pub hostname: Option<String>,
    /// Only ports in this state.
    #[arg(long, value_enum)]
    pub state: Option<PortStateArg>,
    /// Only results last seen at or after this time: RFC 3339 in UTC
    /// (2024-05-01T00:00:00Z) or a duration ago (24h, 7d).
    #[arg(long, value_parser = args::since)]
    pub since: Option<SystemTime>,
}

impl ResultsArgs {
    fn format(&self) -> ResultsFormat {
        if self.json { ResultsFormat::Jsonl } else { self.format }
    }

    fn request(&self, page_token: String) -> pb::ListResultsRequest {
        pb::ListResultsRequest {
            scan_id: self.id.clone(),
            page_size: RESULTS_PAGE,
            page_token,
            cidr: self.cidr.clone().unwrap_or_default(),
            port: self.port,
            hostname: self.hostname.clone().unwrap_or_default(),
            state: self.state.map_or(0, |s| s.to_pb() as i32),
            observed_since: self.since.map(args::timestamp),
        }
    }
}

/// The largest page of results the controller serves.
const RESULTS_PAGE: u32 = 10_000;

/// One exported result: the line the agent prints too, and the port's
/// state.
#[derive(Clone, Debug)]
pub struct Row {
    pub found: Found,
    pub state: &'static str,
}

/// A result as exported, or `None` for an address or port the controller
/// should never send (skipped, as `scan` skips it).
pub fn row(r: &pb::Result) -> Option<Row> {
    let state = match pb::PortState::try_from(r.state) {
        // Results are open ports; a controller before the state field
        // leaves it unset.
        Ok(pb::PortState::Open | pb::PortState::Unspecified) => "open",
        Ok(pb::PortState::Closed) => "closed",
        Ok(pb::PortState::Filtered) => "filtered",
        Err(_) => "unknown",
    };
    Some(Row { found: watch::found(r)?, state })
}

/// `results`: every result of the scan that passes the filters, sorted,
/// in the chosen format.
pub async fn results(c: &mut ApiClient, a: ResultsArgs, headers: bool) -> Result<i32, String> {
    let format = a.format();
    if format == ResultsFormat::NmapXml {
        return nmap_xml(c, &a).await;
    }
    let rows = fetch(c, &a).await?;
    let mut out = BufWriter::new(io::stdout().lock());
    let written = match format {
        ResultsFormat::Jsonl => jsonl(&mut out, &rows),
        ResultsFormat::Csv => csv(&mut out, &rows, headers),
        ResultsFormat::Masscan => masscan(&mut out, &rows),
        ResultsFormat::Text | ResultsFormat::NmapXml => text(&mut out, &rows),
    };
    // An error here is stdout's reader leaving (`| head`): done, quietly.
    let _ = written.and_then(|()| out.flush());
    Ok(0)
}

/// `results --format nmap-xml`: the scan (its ports and times) first, so
/// a scan that is not there fails before its results are fetched.
async fn nmap_xml(c: &mut ApiClient, a: &ResultsArgs) -> Result<i32, String> {
    let scan = c.get_scan(pb::GetScanRequest { id: a.id.clone() }).await.map_err(status)?.into_inner();
    let rows = fetch(c, a).await?;
    let doc = nmap::Document::new(&scan, rows)?;
    let mut out = BufWriter::new(io::stdout().lock());
    let _ = doc.write(&mut out, SystemTime::now()).and_then(|()| out.flush());
    Ok(0)
}

/// Every page of results, sorted by address (IPv4 first) and port.
async fn fetch(c: &mut ApiClient, a: &ResultsArgs) -> Result<Vec<Row>, String> {
    let mut rows = Vec::new();
    let mut token = String::new();
    loop {
        let page = c.list_results(a.request(token)).await.map_err(status)?.into_inner();
        rows.extend(page.results.iter().filter_map(row));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    // IpAddr orders numerically, IPv4 before IPv6.
    rows.sort_by_key(|r| (r.found.ip, r.found.port));
    Ok(rows)
}

fn text(out: &mut impl Write, rows: &[Row]) -> io::Result<()> {
    let mut lines = TextLines::default();
    for r in rows {
        if let Some(line) = lines.line(&r.found) {
            writeln!(out, "{line}")?;
        }
    }
    Ok(())
}

fn jsonl(out: &mut impl Write, rows: &[Row]) -> io::Result<()> {
    rows.iter().try_for_each(|r| writeln!(out, "{}", r.found.to_json()))
}

/// The CSV columns, in order.
pub const CSV_HEADER: &[&str] = &[
    "ip",
    "port",
    "protocol",
    "state",
    "hostname",
    "timestamp",
    "service",
    "product",
    "version",
    "tls",
    "url",
    "host_answers_everything",
];

/// CSV: a header row (unless `--no-headers`), then a record per port.
/// RFC 4180 quoting; records end in `\n`, as every other output here.
fn csv(out: &mut impl Write, rows: &[Row], headers: bool) -> io::Result<()> {
    if headers {
        writeln!(out, "{}", show::csv_record(CSV_HEADER))?;
    }
    rows.iter().try_for_each(|r| writeln!(out, "{}", show::csv_record(&csv_fields(r))))
}

/// A row's CSV fields, [`CSV_HEADER`]'s columns; empty for what is not
/// known (`tls` is empty, not `false`, for a port nothing identified).
pub fn csv_fields(r: &Row) -> Vec<String> {
    let f = &r.found;
    let service = f.service.as_ref();
    let text = |pick: fn(&portfleet_core::Service) -> &str| service.map(pick).unwrap_or_default().to_string();
    vec![
        f.ip.to_string(),
        f.port.to_string(),
        f.protocol.to_string(),
        r.state.to_string(),
        f.host.clone().unwrap_or_default(),
        f.timestamp.map(|t| humantime::format_rfc3339_nanos(t).to_string()).unwrap_or_default(),
        text(|s| &s.name),
        text(|s| &s.product),
        text(|s| &s.version),
        service.map(|s| s.tls.is_some().to_string()).unwrap_or_default(),
        service.and_then(|s| s.http.iter().map(|h| h.url.as_str()).find(|u| !u.is_empty())).unwrap_or("").to_string(),
        f.host_answers_everything.to_string(),
    ]
}

/// masscan's `-oL` list: `#masscan`, a line per port, `# end`.
fn masscan(out: &mut impl Write, rows: &[Row]) -> io::Result<()> {
    writeln!(out, "#masscan")?;
    rows.iter().try_for_each(|r| writeln!(out, "{}", masscan_line(r)))?;
    writeln!(out, "# end")
}

/// `open tcp 80 192.0.2.1 1700000000`: state, protocol, port, address and
/// when it was seen, in Unix seconds (0 when the controller sent no time).
pub fn masscan_line(r: &Row) -> String {
    let f = &r.found;
    let at = f.timestamp.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
    format!("{} {} {} {} {at}", r.state, f.protocol, f.port, f.ip)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    fn result(ip: &str, port: u32) -> pb::Result {
        pb::Result {
            ip: ip.into(),
            port,
            observed_at: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 5 }),
            ..Default::default()
        }
    }

    #[test]
    fn masscan_lines_are_state_protocol_port_address_and_unix_time() {
        let r = row(&result("192.0.2.1", 80)).unwrap();
        assert_eq!(masscan_line(&r), "open tcp 80 192.0.2.1 1700000000");
        let v6 = row(&pb::Result { observed_at: None, ..result("2001:db8::1", 443) }).unwrap();
        assert_eq!(masscan_line(&v6), "open tcp 443 2001:db8::1 0");
        let mut out = Vec::new();
        masscan(&mut out, &[r]).unwrap();
        assert_eq!(String::from_utf8(out).unwrap(), "#masscan\nopen tcp 80 192.0.2.1 1700000000\n# end\n");
    }

    #[test]
    fn csv_has_a_header_and_quotes_what_needs_it() {
        let identified = pb::Result {
            hostname: "web,1".into(),
            service: Some(pb::Service {
                name: "http".into(),
                product: "nginx \"edge\"".into(),
                version: "1.22".into(),
                tls: Some(pb::TlsInfo::default()),
                http: vec![pb::HttpInfo { url: "https://web:443".into(), ..Default::default() }],
                ..Default::default()
            }),
            ..result("192.0.2.1", 443)
        };
        let rows = [row(&identified).unwrap(), row(&result("192.0.2.2", 22)).unwrap()];
        let mut out = Vec::new();
        csv(&mut out, &rows, true).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "ip,port,protocol,state,hostname,timestamp,service,product,version,tls,url,host_answers_everything\n\
             192.0.2.1,443,tcp,open,\"web,1\",2023-11-14T22:13:20.000000005Z,http,\"nginx \"\"edge\"\"\",1.22,true,\
             https://web:443,false\n\
             192.0.2.2,22,tcp,open,,2023-11-14T22:13:20.000000005Z,,,,,,false\n"
        );
        let mut out = Vec::new();
        csv(&mut out, &rows[1..], false).unwrap();
        assert!(String::from_utf8(out).unwrap().starts_with("192.0.2.2,22,"), "--no-headers drops the header");
    }

    #[test]
    fn json_stays_an_alias_of_format_jsonl_and_filters_reach_the_request() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).map(|c| c.command) {
            Ok(Command::Results(a)) => Ok(a),
            Ok(other) => panic!("{other:?}"),
            Err(e) => Err(e),
        };
        assert_eq!(parse(&["portfleet", "results", "s1", "--json"]).unwrap().format(), ResultsFormat::Jsonl);
        assert_eq!(parse(&["portfleet", "results", "s1"]).unwrap().format(), ResultsFormat::Text);
        let a = parse(&["portfleet", "results", "s1", "--format", "nmap-xml"]).unwrap();
        assert_eq!(a.format(), ResultsFormat::NmapXml);
        assert!(parse(&["portfleet", "results", "s1", "--json", "--format", "csv"]).is_err());
        let a = parse(&[
            "portfleet",
            "results",
            "s1",
            "--cidr",
            "10.0.0.0/8",
            "--port",
            "443",
            "--hostname",
            "web",
            "--state",
            "open",
            "--since",
            "2024-05-01T00:00:00Z",
        ])
        .unwrap();
        let r = a.request("t".into());
        assert_eq!((r.cidr.as_str(), r.port, r.hostname.as_str()), ("10.0.0.0/8", Some(443), "web"));
        assert_eq!(r.state, pb::PortState::Open as i32);
        assert_eq!(r.observed_since.map(|t| t.seconds), Some(1_714_521_600));
        assert_eq!(r.page_token, "t");
        let err = parse(&["portfleet", "results", "s1", "--port", "0"]).unwrap_err().to_string();
        assert!(err.contains("--port"), "{err}");
        let err = parse(&["portfleet", "results", "s1", "--since", "soon"]).unwrap_err().to_string();
        assert!(err.contains("--since"), "{err}");
    }
}
