//! One found open port as the command-line tools print it: `ip:port`
//! (`[v6]:port`), or a JSON line with naabu's field names. The agent's
//! standalone `scan` and the `portfleet` client (`scan`, `results`) both
//! print through this type, so a script reads one schema from either.
//!
//! With an identification, the line follows naabu's `-sV` output: `tls`
//! (bool) beside the port, the service's fields flattened into the line
//! (`name`, `product`, `version`, `extra_info`, ...); portfleet's additions
//! are `tls_info` (the certificate and handshake), `http`, `banner`,
//! `rule`, `verified` and `host_answers_everything`.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    time::SystemTime,
};

/// An open TCP port found at `timestamp`, with the hostname its address
/// was resolved from, if any.
///
/// The JSON fields are declared in alphabetical order, which is also the
/// order the earlier `serde_json::json!` output had, so byte-comparing
/// scripts see no change.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Found {
    /// What answers, when the scan identified it; see the module doc.
    #[serde(skip)]
    pub service: Option<crate::Service>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub host_answers_everything: bool,
    pub ip: IpAddr,
    pub port: u16,
    /// Always "tcp" for now; a field so the schema stays naabu's.
    pub protocol: &'static str,
    /// RFC 3339 in UTC with nanoseconds, as naabu writes it.
    #[serde(serialize_with = "rfc3339", skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<SystemTime>,
}

impl Found {
    pub fn tcp(ip: IpAddr, port: u16, timestamp: Option<SystemTime>, host: Option<String>) -> Self {
        Self { host, ip, port, protocol: "tcp", timestamp, service: None, host_answers_everything: false }
    }

    pub fn with_service(mut self, service: Option<crate::Service>, host_answers_everything: bool) -> Self {
        self.service = service;
        self.host_answers_everything = host_answers_everything;
        self
    }

    /// The JSON line (without the newline).
    pub fn to_json(&self) -> String {
        let line = Line {
            found: self,
            tls: self.service.as_ref().map(|s| s.tls.is_some()),
            service: self.service.as_ref().map(View),
        };
        // A struct of plain fields always serialises.
        serde_json::to_string(&line).unwrap_or_default()
    }

    /// The text line: `ip:port`, then what answers when known, in a column
    /// of its own.
    pub fn to_text(&self) -> String {
        let mut line = self.to_string();
        if let Some(s) = &self.service {
            let pad = ADDRESS_COLUMN.saturating_sub(line.len()).max(1);
            line.extend(std::iter::repeat_n(' ', pad));
            line.push_str(&s.summary());
        }
        line
    }
}

/// Width of the address column of identified text lines: `ip:port` of
/// the longest IPv4 address and port, and a blank.
const ADDRESS_COLUMN: usize = "255.255.255.255:65535 ".len();

/// Text lines for a stream of found ports, where an address that answers
/// on every port (a SYN proxy or tarpit) is one line, not one per port.
#[derive(Debug, Default)]
pub struct TextLines {
    /// Addresses whose one line went out. Bounded by the scan's addresses.
    everything: std::collections::HashSet<IpAddr>,
}

impl TextLines {
    /// The line for `f`, or `None` when its address's line went out.
    pub fn line(&mut self, f: &Found) -> Option<String> {
        if !f.host_answers_everything {
            return Some(f.to_text());
        }
        self.everything
            .insert(f.ip)
            .then(|| format!("{} answers on every port (a SYN proxy or tarpit): its open ports are not listed", f.ip))
    }
}

/// The JSON line: the found port, naabu's `tls`, the service flattened.
#[derive(serde::Serialize)]
struct Line<'a> {
    #[serde(flatten)]
    found: &'a Found,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<bool>,
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    service: Option<View<'a>>,
}

/// A service under naabu's flat field names: `tls` is naabu's boolean in
/// the line, so the handshake's details go under `tls_info`.
struct View<'a>(&'a crate::Service);

impl serde::Serialize for View<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let v = self.0;
        let mut m = s.serialize_map(None)?;
        for (k, val) in [
            ("name", &v.name),
            ("product", &v.product),
            ("version", &v.version),
            ("extra_info", &v.extra_info),
            ("hostname", &v.hostname),
            ("os_type", &v.os_type),
            ("device_type", &v.device_type),
            ("tunnel", &v.tunnel),
            ("method", &v.method),
        ] {
            if !val.is_empty() {
                m.serialize_entry(k, val)?;
            }
        }
        m.serialize_entry("confidence", &v.confidence)?;
        if !v.cpes.is_empty() {
            m.serialize_entry("cpes", &v.cpes)?;
        }
        if let Some(tls) = &v.tls {
            m.serialize_entry("tls_info", tls)?;
        }
        if !v.http.is_empty() {
            m.serialize_entry("http", &v.http)?;
        }
        if !v.banner.is_empty() {
            m.serialize_entry("banner", &v.banner)?;
        }
        if !v.rule.is_empty() {
            m.serialize_entry("rule", &v.rule)?;
        }
        m.serialize_entry("verified", &v.verified)?;
        m.end()
    }
}

/// `ip:port`, with IPv6 in brackets.
impl fmt::Display for Found {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        SocketAddr::new(self.ip, self.port).fmt(f)
    }
}

fn rfc3339<S: serde::Serializer>(t: &Option<SystemTime>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => s.collect_str(&humantime::format_rfc3339_nanos(*t)),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::*;

    #[test]
    fn prints_as_naabu_does() {
        let at = UNIX_EPOCH + Duration::new(1_700_000_000, 5);
        let f = Found::tcp("192.0.2.1".parse().unwrap(), 80, Some(at), Some("web".into()));
        assert_eq!(
            f.to_json(),
            r#"{"host":"web","ip":"192.0.2.1","port":80,"protocol":"tcp","timestamp":"2023-11-14T22:13:20.000000005Z"}"#
        );
        assert_eq!(f.to_string(), "192.0.2.1:80");
        let f = Found::tcp("2001:db8::1".parse().unwrap(), 443, None, None);
        assert_eq!(f.to_json(), r#"{"ip":"2001:db8::1","port":443,"protocol":"tcp"}"#);
        assert_eq!(f.to_string(), "[2001:db8::1]:443");
    }

    #[test]
    fn an_identified_port_prints_as_naabu_sv_does() {
        let service = crate::Service {
            name: "https".into(),
            product: "nginx".into(),
            version: "1.22.1".into(),
            confidence: 10,
            tls: Some(crate::service::Tls { version: "TLSv1.3".into(), ..Default::default() }),
            verified: true,
            ..Default::default()
        };
        let f = Found::tcp("192.0.2.1".parse().unwrap(), 443, None, None).with_service(Some(service), false);
        assert_eq!(
            f.to_json(),
            concat!(
                r#"{"ip":"192.0.2.1","port":443,"protocol":"tcp","tls":true,"name":"https","product":"nginx","#,
                r#""version":"1.22.1","confidence":10,"tls_info":{"version":"TLSv1.3","cipher":"","not_before":0,"#,
                r#""not_after":0,"self_signed":false,"sha256":""},"verified":true}"#
            )
        );
        assert_eq!(f.to_text(), "192.0.2.1:443         https nginx 1.22.1");
        let v6 = Found::tcp("2001:db8::1:2:3:4".parse().unwrap(), 8443, None, None)
            .with_service(Some(crate::Service { name: "ssh".into(), verified: true, ..Default::default() }), false);
        assert_eq!(v6.to_text(), "[2001:db8::1:2:3:4]:8443 ssh");
        let tarpit = Found::tcp("192.0.2.2".parse().unwrap(), 1, None, None).with_service(None, true);
        assert_eq!(tarpit.to_json(), r#"{"host_answers_everything":true,"ip":"192.0.2.2","port":1,"protocol":"tcp"}"#);
        let mut lines = TextLines::default();
        assert_eq!(
            lines.line(&tarpit).as_deref(),
            Some("192.0.2.2 answers on every port (a SYN proxy or tarpit): its open ports are not listed")
        );
        let other_port = Found { port: 2, ..tarpit.clone() };
        assert_eq!(lines.line(&other_port), None);
        assert_eq!(lines.line(&f).as_deref(), Some("192.0.2.1:443         https nginx 1.22.1"));
    }
}
