//! `results --format nmap-xml`: one scan as nmap's XML output (`-oX`,
//! `xmloutputversion` 1.05), valid against nmap's DTD (Debian's
//! `/usr/share/nmap/nmap.dtd`; a test checks it with xmllint), so tools
//! that import nmap scans read portfleet's.
//!
//! nmap lists ports under their `<host>`, so the document collects the
//! results into a [`BTreeMap`] by address before writing anything: the
//! whole export is in memory, which is acceptable for an export (the other
//! formats sort in memory too).
//!
//! What nmap would say and portfleet cannot know is filled in as nmap
//! does for a SYN scan: every listed host is `up` (it answered), the
//! scanned ports a host did not answer on are counted as `closed`
//! `<extraports>`, reasons are `syn-ack` with a TTL of 0. The `scanner`
//! attribute is `nmap`, the only value the DTD allows; the document names
//! portfleet in a comment, in `args` (the scan as a `portfleet scan`
//! command line) and in `version`.

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use portfleet_core::{PortSet, Service};
use portfleet_proto::v1 as pb;

use crate::{export::Row, show};

/// The one `scanner` value nmap's DTD accepts.
const SCANNER: &str = "nmap";
/// The nmap XML output version this document follows.
const XML_OUTPUT_VERSION: &str = "1.05";

/// A scan's results grouped for nmap's XML.
pub struct Document<'a> {
    scan: &'a pb::Scan,
    request: pb::CreateScanRequest,
    /// The scan's ports, from its request (`numservices`, `services` and
    /// the closed count of each host).
    ports: PortSet,
    /// By address (IPv4 first), each host's ports by number, once each.
    hosts: BTreeMap<IpAddr, Vec<Row>>,
}

impl<'a> Document<'a> {
    /// Groups the rows; fails when the scan's port list cannot be read.
    pub fn new(scan: &'a pb::Scan, rows: Vec<Row>) -> Result<Self, String> {
        let request = scan.request.clone().unwrap_or_default();
        let ports = PortSet::parse(&request.ports).map_err(|e| format!("scan {}: its port list: {e}", scan.id))?;
        let mut hosts: BTreeMap<IpAddr, Vec<Row>> = BTreeMap::new();
        for r in rows {
            hosts.entry(r.found.ip).or_default().push(r);
        }
        for rows in hosts.values_mut() {
            rows.sort_by_key(|r| r.found.port);
            rows.dedup_by_key(|r| r.found.port);
        }
        Ok(Self { scan, request, ports, hosts })
    }

    /// The document; `now` ends a scan that has not ended.
    pub fn write(&self, out: &mut impl Write, now: SystemTime) -> io::Result<()> {
        let start =
            show::system_time(self.scan.start_time.as_ref().or(self.scan.create_time.as_ref())).unwrap_or(UNIX_EPOCH);
        let end = show::system_time(self.scan.end_time.as_ref()).unwrap_or(now);
        self.header(out, start)?;
        for (ip, rows) in &self.hosts {
            self.host(out, *ip, rows)?;
        }
        self.runstats(out, end, end.duration_since(start).unwrap_or_default())?;
        writeln!(out, "</nmaprun>")
    }

    fn header(&self, out: &mut impl Write, start: SystemTime) -> io::Result<()> {
        writeln!(out, "<?xml version=\"1.0\" encoding=\"UTF-8\"?>")?;
        writeln!(out, "<!DOCTYPE nmaprun>")?;
        writeln!(out, "<!-- {} -->", comment(self.scan))?;
        let nmaprun = attrs(&[
            ("scanner", SCANNER.into()),
            ("args", command_line(&self.request)),
            ("start", unix(start).to_string()),
            ("startstr", humantime::format_rfc3339_seconds(start).to_string()),
            ("version", env!("CARGO_PKG_VERSION").into()),
            ("xmloutputversion", XML_OUTPUT_VERSION.into()),
        ]);
        writeln!(out, "<nmaprun{nmaprun}>")?;
        let scan_type = match pb::ScanType::try_from(self.request.scan_type) {
            Ok(pb::ScanType::Connect) => "connect",
            _ => "syn",
        };
        let scaninfo = empty(
            "scaninfo",
            &[
                ("type", scan_type.into()),
                ("protocol", "tcp".into()),
                ("numservices", self.ports.len().to_string()),
                // PortSet's canonical form is nmap's range syntax.
                ("services", self.ports.to_string()),
            ],
        );
        writeln!(out, "{scaninfo}")?;
        writeln!(out, "<verbose level=\"0\"/>")?;
        writeln!(out, "<debugging level=\"0\"/>")
    }

    fn host(&self, out: &mut impl Write, ip: IpAddr, rows: &[Row]) -> io::Result<()> {
        let tarpit = rows.iter().any(|r| r.found.host_answers_everything);
        let comment = if tarpit {
            attrs(&[("comment", "answers on every port (a SYN proxy or tarpit)".into())])
        } else {
            String::new()
        };
        writeln!(out, "<host{comment}><status state=\"up\" reason=\"syn-ack\" reason_ttl=\"0\"/>")?;
        let addrtype = if ip.is_ipv4() { "ipv4" } else { "ipv6" };
        writeln!(out, "{}", empty("address", &[("addr", ip.to_string()), ("addrtype", addrtype.into())]))?;
        let mut names: Vec<&str> = Vec::new();
        for name in rows.iter().filter_map(|r| r.found.host.as_deref()) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
        if !names.is_empty() {
            let names: String =
                names.iter().map(|n| empty("hostname", &[("name", (*n).into()), ("type", "user".into())])).collect();
            writeln!(out, "<hostnames>{names}</hostnames>")?;
        }
        writeln!(out, "<ports>")?;
        let listed = rows.iter().filter(|r| self.ports.contains(r.found.port)).count();
        let closed = (self.ports.len() as usize).saturating_sub(listed);
        if closed > 0 {
            writeln!(out, "{}", empty("extraports", &[("state", "closed".into()), ("count", closed.to_string())]))?;
        }
        for r in rows {
            writeln!(out, "{}", port(r))?;
        }
        writeln!(out, "</ports>")?;
        writeln!(out, "</host>")
    }

    fn runstats(&self, out: &mut impl Write, end: SystemTime, elapsed: Duration) -> io::Result<()> {
        let timestr = humantime::format_rfc3339_seconds(end).to_string();
        let elapsed = format!("{:.2}", elapsed.as_secs_f64());
        let up = self.hosts.len() as u64;
        let addresses = match self.scan.address_count {
            1 => "1 IP address".to_string(),
            n => format!("{n} IP addresses"),
        };
        let summary = format!(
            "portfleet done at {timestr}; {addresses} ({} up) scanned in {elapsed} seconds",
            show::count(up, "host")
        );
        let mut finished =
            vec![("time", unix(end).to_string()), ("timestr", timestr), ("elapsed", elapsed), ("summary", summary)];
        if self.scan.state == pb::ScanState::Failed as i32 {
            finished.push(("exit", "error".into()));
            finished.push(("errormsg", self.scan.error.clone()));
        } else {
            finished.push(("exit", "success".into()));
        }
        writeln!(out, "<runstats>{}", empty("finished", &finished))?;
        let hosts = empty("hosts", &[("up", up.to_string()), ("down", "0".into()), ("total", up.to_string())]);
        writeln!(out, "{hosts}</runstats>")
    }
}

/// `<port>` with its state and, when identified, its `<service>`.
fn port(r: &Row) -> String {
    let reason = match r.state {
        "open" => "syn-ack",
        "closed" => "reset",
        "filtered" => "no-response",
        _ => "unknown",
    };
    let state = empty("state", &[("state", r.state.into()), ("reason", reason.into()), ("reason_ttl", "0".into())]);
    let service = r.found.service.as_ref().map(service).unwrap_or_default();
    format!("<port protocol=\"tcp\" portid=\"{}\">{state}{service}</port>", r.found.port)
}

/// nmap's `<service>`: its names for the fields, `method` `probed` or
/// `table` (a soft match was probed), `conf` 0-10, the CPEs inside.
fn service(s: &Service) -> String {
    let name = if s.name.is_empty() { "unknown" } else { s.name.as_str() };
    let mut a: Vec<(&str, String)> = vec![("name", name.into())];
    for (k, v) in [
        ("product", &s.product),
        ("version", &s.version),
        ("extrainfo", &s.extra_info),
        ("hostname", &s.hostname),
        ("ostype", &s.os_type),
        ("devicetype", &s.device_type),
    ] {
        if !v.is_empty() {
            a.push((k, v.clone()));
        }
    }
    if s.tunnel == "ssl" || s.tls.is_some() {
        a.push(("tunnel", "ssl".into()));
    }
    let method = match s.method.as_str() {
        "table" => "table",
        "" if s.confidence <= 3 => "table",
        _ => "probed",
    };
    a.push(("method", method.into()));
    a.push(("conf", s.confidence.min(10).to_string()));
    if s.cpes.is_empty() {
        return empty("service", &a);
    }
    let cpes: String = s.cpes.iter().map(|c| format!("<cpe>{}</cpe>", escape(c))).collect();
    format!("<service{}>{cpes}</service>", attrs(&a))
}

/// The scan as the `portfleet scan` command line that would repeat it
/// (nmap's `args` is the command that ran the scan).
fn command_line(r: &pb::CreateScanRequest) -> String {
    let scan_type = match pb::ScanType::try_from(r.scan_type) {
        Ok(pb::ScanType::Connect) => "connect",
        _ => "syn",
    };
    let mut parts = vec!["portfleet scan --ports".to_string(), r.ports.clone(), "--type".into(), scan_type.into()];
    if r.rate > 0 {
        parts.extend(["--rate".into(), r.rate.to_string()]);
    }
    if !r.target_group.is_empty() {
        parts.extend(["--group".into(), r.target_group.clone()]);
    }
    parts.extend(r.targets.iter().cloned());
    parts.join(" ")
}

/// The comment naming the exporter: the scan id only when a comment can
/// hold it as it is (no `--`, no trailing `-`, no control character).
fn comment(scan: &pb::Scan) -> String {
    let version = env!("CARGO_PKG_VERSION");
    let id = &scan.id;
    let fits = !id.is_empty() && !id.contains("--") && !id.ends_with('-') && !id.chars().any(char::is_control);
    if fits {
        format!("portfleet {version}: scan {id} as nmap XML")
    } else {
        format!("portfleet {version}: a scan as nmap XML")
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// `<name k="v" .../>`.
fn empty(name: &str, pairs: &[(&str, String)]) -> String {
    format!("<{name}{}/>", attrs(pairs))
}

/// ` k="v"` for each pair, the values escaped.
fn attrs(pairs: &[(&str, String)]) -> String {
    pairs.iter().map(|(k, v)| format!(" {k}=\"{}\"", escape(v))).collect()
}

/// Text made safe for XML content and attribute values: the five markup
/// characters as entities, tab and line breaks as character references
/// (attribute values keep them), and every other control character -
/// which XML 1.0 cannot carry - as U+FFFD.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' => out.push_str("&#9;"),
            '\n' => out.push_str("&#10;"),
            '\r' => out.push_str("&#13;"),
            '\u{fffe}' | '\u{ffff}' => out.push('\u{fffd}'),
            c if c.is_control() => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{path::Path, process::Command};

    use super::*;
    use crate::export;

    /// Debian's copy of nmap's DTD (package nmap-common).
    const DTD: &str = "/usr/share/nmap/nmap.dtd";

    fn at(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 0 })
    }

    fn scan(state: pb::ScanState) -> pb::Scan {
        pb::Scan {
            id: "0190c0de-0000-7000-8000-000000000001".into(),
            state: state as i32,
            request: Some(pb::CreateScanRequest {
                targets: vec!["192.0.2.0/24".into(), "2001:db8::1".into(), "web&<\"'>.example".into()],
                ports: "22,80,443,8000-8100".into(),
                scan_type: pb::ScanType::Syn as i32,
                rate: 1000,
                ..Default::default()
            }),
            address_count: 258,
            create_time: at(1_700_000_000),
            start_time: at(1_700_000_001),
            end_time: at(1_700_000_031),
            error: "agent \"a1\" lost <everything>".into(),
            ..Default::default()
        }
    }

    fn result(ip: &str, port: u32) -> pb::Result {
        pb::Result { ip: ip.into(), port, observed_at: at(1_700_000_010), ..Default::default() }
    }

    fn rows() -> Vec<Row> {
        let identified = pb::Result {
            hostname: "web&<\"'>.example".into(),
            service: Some(pb::Service {
                name: "http".into(),
                product: "nginx <\"edge\"> & 'co'".into(),
                version: "1.22.1".into(),
                extra_info: "tab\there\nline\u{1}ctl".into(),
                cpes: vec!["cpe:/a:nginx:nginx:1.22.1".into()],
                method: "softmatch".into(),
                confidence: 12,
                tls: Some(pb::TlsInfo::default()),
                ..Default::default()
            }),
            ..result("192.0.2.10", 443)
        };
        let table = pb::Result {
            service: Some(pb::Service {
                name: "ssh".into(),
                confidence: 3,
                method: "table".into(),
                ..Default::default()
            }),
            ..result("192.0.2.10", 22)
        };
        let tarpit = pb::Result { host_answers_everything: true, ..result("192.0.2.99", 8080) };
        [identified, table, tarpit, result("2001:db8::1", 80), result("192.0.2.2", 80), result("192.0.2.10", 22)]
            .iter()
            .filter_map(export::row)
            .collect()
    }

    fn document(state: pb::ScanState) -> String {
        let s = scan(state);
        let doc = Document::new(&s, rows()).unwrap();
        let mut out = Vec::new();
        doc.write(&mut out, SystemTime::now()).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Runs xmllint against the DTD; `false` when either is missing here
    /// (a failure under `CI=true`, where both must be installed).
    fn validate(name: &str, xml: &str) -> bool {
        let ci = std::env::var("CI").is_ok_and(|v| v == "true");
        let missing = |what: &str| {
            assert!(!ci, "{what} is missing under CI=true: apt-get install -y libxml2-utils nmap-common");
            eprintln!("notice: {what} is missing, the nmap XML is not validated (apt-get install -y libxml2-utils)");
            false
        };
        if !Path::new(DTD).exists() {
            return missing(DTD);
        }
        let path = std::env::temp_dir().join(format!("portfleet-cli-{}-{name}.xml", std::process::id()));
        std::fs::write(&path, xml).unwrap();
        let run = Command::new("xmllint").args(["--noout", "--dtdvalid", DTD]).arg(&path).output();
        let _ = std::fs::remove_file(&path);
        let output = match run {
            Ok(output) => output,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return missing("xmllint"),
            Err(e) => panic!("xmllint: {e}"),
        };
        assert!(
            output.status.success(),
            "not valid against {DTD}:\n{}\n{xml}",
            String::from_utf8_lossy(&output.stderr)
        );
        true
    }

    #[test]
    fn the_document_is_valid_against_nmaps_dtd() {
        for (name, state) in [("completed", pb::ScanState::Completed), ("failed", pb::ScanState::Failed)] {
            let xml = document(state);
            validate(name, &xml);
        }
        let s = pb::Scan { id: "x--".into(), ..scan(pb::ScanState::Running) };
        let mut out = Vec::new();
        Document::new(&s, Vec::new()).unwrap().write(&mut out, SystemTime::now()).unwrap();
        let xml = String::from_utf8(out).unwrap();
        assert!(xml.contains("<!-- portfleet ") && !xml.contains("x--"), "{xml}");
        validate("empty", &xml);
    }

    #[test]
    fn hosts_are_sorted_with_their_ports_and_closed_counts() {
        let xml = document(pb::ScanState::Completed);
        assert!(xml.starts_with("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<!DOCTYPE nmaprun>\n"), "{xml}");
        assert!(xml.contains(
            "<scaninfo type=\"syn\" protocol=\"tcp\" numservices=\"104\" services=\"22,80,443,8000-8100\"/>"
        ));
        let order: Vec<usize> =
            ["\"192.0.2.2\"", "\"192.0.2.10\"", "\"192.0.2.99\"", "\"2001:db8::1\" addrtype=\"ipv6\""]
                .iter()
                .map(|a| xml.find(a).unwrap_or_else(|| panic!("{a} missing: {xml}")))
                .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        // 192.0.2.10: 22 (once) and 443 listed, 102 closed.
        assert!(xml.contains("<extraports state=\"closed\" count=\"102\"/>"), "{xml}");
        assert_eq!(xml.matches("portid=\"22\"").count(), 1);
        assert!(xml.find("portid=\"22\"") < xml.find("portid=\"443\""));
        assert!(xml.contains("<hostname name=\"web&amp;&lt;&quot;&apos;&gt;.example\" type=\"user\"/>"), "{xml}");
        assert!(xml.contains(
            "<service name=\"http\" product=\"nginx &lt;&quot;edge&quot;&gt; &amp; &apos;co&apos;\" version=\"1.22.1\" \
             extrainfo=\"tabherelinectl\" tunnel=\"ssl\" method=\"probed\" conf=\"10\">\
             <cpe>cpe:/a:nginx:nginx:1.22.1</cpe></service>"
        ), "{xml}");
        assert!(xml.contains("<service name=\"ssh\" method=\"table\" conf=\"3\"/>"));
        assert!(xml.contains("<host comment=\"answers on every port (a SYN proxy or tarpit)\">"));
        assert!(xml.contains("elapsed=\"30.00\""));
        assert!(xml.contains("exit=\"success\""));
        assert!(xml.contains("<hosts up=\"4\" down=\"0\" total=\"4\"/></runstats>\n</nmaprun>\n"));
        let failed = document(pb::ScanState::Failed);
        assert!(failed.contains("exit=\"error\" errormsg=\"agent &quot;a1&quot; lost &lt;everything&gt;\""));
    }

    #[test]
    fn a_scan_without_a_port_list_is_refused_by_name() {
        let s = pb::Scan { id: "s1".into(), ..Default::default() };
        let err = Document::new(&s, Vec::new()).err().unwrap();
        assert!(err.starts_with("scan s1: its port list"), "{err}");
    }

    #[test]
    fn escaping_leaves_nothing_xml_cannot_carry() {
        assert_eq!(escape("a&b<c>d\"e'f"), "a&amp;b&lt;c&gt;d&quot;e&apos;f");
        assert_eq!(escape("\u{0}\u{1b}[2J\u{fffe}é"), "\u{fffd}\u{fffd}[2J\u{fffd}é");
    }
}
