//! Flag values shared by several subcommands, parsed where clap reads
//! them: output formats, port states, ports, `--since` times and
//! retention periods. A bad value is refused by clap with a message that
//! names the flag and says what is accepted.
//!
//! Durations use `humantime::parse_duration`, the parser `scan --timeout`
//! uses (`30s`, `24h`, `90d`, `1h 30m`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use portfleet_proto::v1 as pb;

/// How `results` prints a scan's ports.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResultsFormat {
    /// `ip:port` lines and what answers (the default).
    Text,
    /// JSON Lines, the schema of `portfleet-agent scan --json`.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
    /// nmap's XML output (`-oX`).
    NmapXml,
    /// masscan's list output (`-oL`).
    Masscan,
}

/// How the inventory lists (`hosts`, `changes`) print.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListFormat {
    /// An aligned table.
    Text,
    /// One JSON object per line.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
}

/// How one-object views (`host`, `diff`) print.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewFormat {
    Text,
    Jsonl,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortStateArg {
    Open,
    Closed,
    Filtered,
}

impl PortStateArg {
    pub fn to_pb(self) -> pb::PortState {
        match self {
            Self::Open => pb::PortState::Open,
            Self::Closed => pb::PortState::Closed,
            Self::Filtered => pb::PortState::Filtered,
        }
    }
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChangeKindArg {
    Opened,
    Closed,
    ServiceChanged,
}

impl ChangeKindArg {
    pub fn to_pb(self) -> pb::ChangeKind {
        match self {
            Self::Opened => pb::ChangeKind::Opened,
            Self::Closed => pb::ChangeKind::Closed,
            Self::ServiceChanged => pb::ChangeKind::ServiceChanged,
        }
    }
}

/// A TCP port, 1-65535 (`--port`).
pub fn port(s: &str) -> Result<u32, String> {
    match s.trim().parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p),
        _ => Err(format!("{} is not a port (1-65535)", portfleet_core::text::echo(s))),
    }
}

/// `--since`: an RFC 3339 time in UTC (`2024-05-01T00:00:00Z`) or a
/// duration ago (`24h`, `7d`), taken from this host's clock now.
pub fn since(s: &str) -> Result<SystemTime, String> {
    since_at(s, SystemTime::now())
}

fn since_at(s: &str, now: SystemTime) -> Result<SystemTime, String> {
    let s = s.trim();
    let t = match humantime::parse_rfc3339_weak(s) {
        Ok(t) => Some(t),
        Err(_) => {
            let ago = humantime::parse_duration(s).map_err(|_| {
                format!(
                    "{} is neither an RFC 3339 time in UTC (2024-05-01T00:00:00Z) nor a duration ago (24h, 7d)",
                    portfleet_core::text::echo(s)
                )
            })?;
            now.checked_sub(ago)
        }
    };
    t.filter(|t| *t >= UNIX_EPOCH).ok_or_else(|| format!("{} is before 1970", portfleet_core::text::echo(s)))
}

/// A retention period: a duration (`90d`, `2w`, `720h`), or `0` /
/// `forever` to keep scans for ever (a zero duration).
pub fn retention(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("forever") || s.eq_ignore_ascii_case("for ever") {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(s).map_err(|e| {
        format!("{}: {e} (a duration such as 90d or 720h; 0 or forever keeps for ever)", portfleet_core::text::echo(s))
    })
}

/// What is left of a `--limit` while pages come in (0: no limit).
#[derive(Clone, Copy, Debug)]
pub struct Limit(Option<u64>);

impl Limit {
    pub fn new(limit: u32) -> Self {
        Self((limit > 0).then_some(u64::from(limit)))
    }

    /// The page to ask for: what is left, at most `max`.
    pub fn page_size(self, max: u32) -> u32 {
        self.0.map_or(max, |left| left.min(u64::from(max)) as u32)
    }

    /// The items of a page the limit lets through.
    pub fn take<T>(&mut self, mut items: Vec<T>) -> Vec<T> {
        if let Some(left) = &mut self.0 {
            items.truncate(usize::try_from(*left).unwrap_or(usize::MAX));
            *left -= items.len() as u64;
        }
        items
    }

    /// Whether nothing more may be shown.
    pub fn reached(self) -> bool {
        self.0 == Some(0)
    }
}

/// A time for the wire.
pub fn timestamp(t: SystemTime) -> prost_types::Timestamp {
    prost_types::Timestamp::from(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_a_time_or_a_duration_ago() {
        let now = humantime::parse_rfc3339("2024-05-02T00:00:00Z").unwrap();
        assert_eq!(since_at("24h", now).unwrap(), humantime::parse_rfc3339("2024-05-01T00:00:00Z").unwrap());
        assert_eq!(
            since_at("2024-04-01T12:00:00Z", now).unwrap(),
            humantime::parse_rfc3339("2024-04-01T12:00:00Z").unwrap()
        );
        let err = since_at("yesterday", now).unwrap_err();
        assert!(err.contains("\"yesterday\"") && err.contains("RFC 3339"), "{err}");
        assert!(since_at("100y", now).unwrap_err().contains("before 1970"), "not a negative time");
    }

    #[test]
    fn retention_keeps_for_ever_with_zero_or_forever() {
        assert_eq!(retention("90d").unwrap(), Duration::from_secs(90 * 86_400));
        assert_eq!(retention("0").unwrap(), Duration::ZERO);
        assert_eq!(retention("forever").unwrap(), Duration::ZERO);
        assert!(retention("soon").unwrap_err().contains("forever"));
    }

    #[test]
    fn a_limit_cuts_pages_and_zero_is_none() {
        let mut l = Limit::new(5);
        assert_eq!(l.page_size(1000), 5);
        assert_eq!(l.take(vec![1, 2, 3]), vec![1, 2, 3]);
        assert_eq!(l.page_size(1000), 2);
        assert_eq!(l.take(vec![4, 5, 6]), vec![4, 5]);
        assert!(l.reached());
        let mut none = Limit::new(0);
        assert_eq!(none.page_size(1000), 1000);
        assert_eq!(none.take(vec![1; 3000]).len(), 3000);
        assert!(!none.reached());
    }

    #[test]
    fn ports_are_1_to_65535() {
        assert_eq!(port("443"), Ok(443));
        assert!(port("0").is_err());
        assert!(port("65536").is_err());
        assert!(port("http").unwrap_err().contains("\"http\""));
    }
}
