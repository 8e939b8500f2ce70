//! One found open port as the command-line tools print it: `ip:port`
//! (`[v6]:port`), or a JSON line with naabu's field names. The agent's
//! standalone `scan` and the `portfleet` client (`scan`, `results`) both
//! print through this type, so a script reads one schema from either.

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
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
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
        Self { host, ip, port, protocol: "tcp", timestamp }
    }

    /// The JSON line (without the newline).
    pub fn to_json(&self) -> String {
        // A struct of plain fields always serialises.
        serde_json::to_string(self).unwrap_or_default()
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
}
