//! CDN and WAF awareness: which provider's edge, if any, an address is on
//! (like naabu's `-exclude-cdn`). A shared edge answers for thousands of
//! customers, so probing all its ports costs probes and reports the CDN's
//! open ports rather than the target's; [`CdnPolicy`] says what a scan does
//! with such addresses.
//!
//! The ranges are compiled in from `core/data/cdn-ranges.txt`: the lists
//! Cloudflare, Fastly, Amazon CloudFront, Akamai, Imperva and Azure Front
//! Door publish, and projectdiscovery/cdncheck's for Sucuri, which
//! publishes none. The file's header names each source and the date the
//! data was taken ([`data_date`]). Refresh it with
//! `scripts/refresh-cdn-ranges.py` (which fetches from the providers and
//! refuses to write if any source fails) and rebuild; `--check FILE`
//! validates a file without network.

use std::{collections::BTreeMap, fmt, net::IpAddr, sync::LazyLock};

use ipnet::IpNet;

use crate::{AddrRange, AddressSet, canonical_ip, canonical_net, text::echo};

const DATA: &str = include_str!("../data/cdn-ranges.txt");

/// The ports a CDN edge serves for its customers, probed under
/// [`CdnPolicy::WebPorts`].
pub const WEB_PORTS: [u16; 2] = [80, 443];

static TABLE: LazyLock<Table> = LazyLock::new(|| {
    // The data is compiled in and `embedded_data_parses` parses these very
    // bytes, so a tested build cannot fail here.
    Table::parse(DATA).unwrap_or_else(|e| panic!("core/data/cdn-ranges.txt: {e}"))
});

/// The provider (e.g. `"cloudflare"`) whose published edge ranges hold
/// `ip`; IPv4-mapped IPv6 addresses are looked up as IPv4. Where two
/// providers' ranges overlap, the range starting nearest below `ip` wins
/// (for nested blocks, the more specific).
pub fn provider(ip: IpAddr) -> Option<&'static str> {
    TABLE.provider(ip)
}

/// Every provider's ranges as one set, for planning (a scan's edges are
/// its addresses intersected with this).
pub fn addresses() -> &'static AddressSet {
    &TABLE.all
}

/// The day the embedded ranges were taken (`YYYY-MM-DD`, the data file's
/// `# date:` line), to show how stale they may be.
pub fn data_date() -> &'static str {
    TABLE.date
}

/// What a scan does with addresses on a CDN or WAF edge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum CdnPolicy {
    /// Probe them like any other address.
    #[default]
    All,
    /// Probe only [`WEB_PORTS`]: the edge's other ports say nothing about
    /// the customer behind it.
    WebPorts,
    /// Leave them out of the scan.
    Skip,
}

impl CdnPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::WebPorts => "web",
            Self::Skip => "skip",
        }
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "all" => Ok(Self::All),
            "web" => Ok(Self::WebPorts),
            "skip" => Ok(Self::Skip),
            _ => Err(format!("{}: not a CDN policy (expected all, web or skip)", echo(s))),
        }
    }
}

/// Why the data file is unacceptable; `line` is 1-based, 0 for the file
/// as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ParseError {
    line: usize,
    reason: String,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 { f.write_str(&self.reason) } else { write!(f, "line {}: {}", self.line, self.reason) }
    }
}

/// One provider's inclusive range; `reach` is the highest `hi` of this
/// span and all before it, which bounds the backward scan in `lookup`.
#[derive(Clone, Copy, Debug)]
struct Span<T> {
    lo: T,
    hi: T,
    reach: T,
    provider: &'static str,
}

/// The parsed data: spans sorted by `lo` per family, so a lookup is a
/// binary search.
#[derive(Debug)]
struct Table {
    date: &'static str,
    v4: Vec<Span<u32>>,
    v6: Vec<Span<u128>>,
    all: AddressSet,
}

impl Table {
    fn parse(text: &'static str) -> Result<Self, ParseError> {
        let mut date = None;
        let mut by_provider: BTreeMap<&'static str, Vec<AddrRange>> = BTreeMap::new();
        for (i, line) in text.lines().enumerate() {
            let bad = |reason: String| ParseError { line: i + 1, reason };
            let line = line.trim();
            if let Some(comment) = line.strip_prefix('#') {
                if let Some(d) = comment.trim_start().strip_prefix("date:") {
                    let d = d.trim();
                    if !is_date(d) {
                        return Err(bad(format!("{} is not a YYYY-MM-DD date", echo(d))));
                    }
                    if date.replace(d).is_some() {
                        return Err(bad("a second date line".into()));
                    }
                }
                continue;
            }
            if line.is_empty() {
                continue;
            }
            let mut fields = line.split_ascii_whitespace();
            let (Some(provider), Some(cidr), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(bad(format!("expected \"<provider> <cidr>\", got {}", echo(line))));
            };
            if !is_provider(provider) {
                return Err(bad(format!("{}: provider names are lowercase letters, digits and -", echo(provider))));
            }
            let net: IpNet = cidr.parse().map_err(|_| bad(format!("{} is not a CIDR block", echo(cidr))))?;
            // Host bits set mean a typo or a mangled source: refuse rather
            // than guess which block was meant.
            if net.trunc() != net {
                return Err(bad(format!("{} has host bits set (the block is {})", echo(cidr), net.trunc())));
            }
            by_provider.entry(provider).or_default().push(AddrRange::from_net(canonical_net(net)));
        }
        let date = date.ok_or_else(|| ParseError { line: 0, reason: "no \"# date: YYYY-MM-DD\" line".into() })?;
        if by_provider.is_empty() {
            return Err(ParseError { line: 0, reason: "no ranges".into() });
        }
        let all = AddressSet::new(by_provider.values().flatten().copied());
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (provider, ranges) in by_provider {
            // Merged per provider, so overlapping or adjacent entries of
            // one provider make one span.
            for r in AddressSet::new(ranges).ranges() {
                match (r.first(), r.last()) {
                    (IpAddr::V4(lo), IpAddr::V4(hi)) => v4.push(span(lo.into(), hi.into(), provider)),
                    (IpAddr::V6(lo), IpAddr::V6(hi)) => v6.push(span(lo.into(), hi.into(), provider)),
                    _ => unreachable!("both ends of a range have its family"),
                }
            }
        }
        Ok(Self { date, v4: index(v4), v6: index(v6), all })
    }

    fn provider(&self, ip: IpAddr) -> Option<&'static str> {
        match canonical_ip(ip) {
            IpAddr::V4(v4) => lookup(&self.v4, u32::from(v4)),
            IpAddr::V6(v6) => lookup(&self.v6, u128::from(v6)),
        }
    }
}

fn span<T: Copy>(lo: T, hi: T, provider: &'static str) -> Span<T> {
    Span { lo, hi, reach: hi, provider }
}

/// Sorts by `lo`, wider first on ties so the narrower span is met first
/// when scanning back, and fills in `reach`.
fn index<T: Copy + Ord>(mut spans: Vec<Span<T>>) -> Vec<Span<T>> {
    spans.sort_unstable_by(|a, b| a.lo.cmp(&b.lo).then(b.hi.cmp(&a.hi)).then(a.provider.cmp(b.provider)));
    let mut reach = None;
    for s in &mut spans {
        let r = reach.map_or(s.hi, |r: T| r.max(s.hi));
        s.reach = r;
        reach = Some(r);
    }
    spans
}

/// The nearest span starting at or below `x` that contains it. Providers'
/// spans may overlap each other, so the nearest start may end below `x`
/// while an earlier, wider one holds it; `reach` stops the scan back as
/// soon as no earlier span can.
fn lookup<T: Copy + Ord>(spans: &[Span<T>], x: T) -> Option<&'static str> {
    let end = spans.partition_point(|s| s.lo <= x);
    spans[..end].iter().rev().take_while(|s| s.reach >= x).find(|s| s.hi >= x).map(|s| s.provider)
}

fn is_provider(s: &str) -> bool {
    s.bytes().next().is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// `YYYY-MM-DD` with a plausible month and day.
fn is_date(s: &str) -> bool {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| {
        s.get(r).filter(|d| d.bytes().all(|c| c.is_ascii_digit())).and_then(|d| d.parse::<u16>().ok())
    };
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && num(0..4).is_some()
        && matches!(num(5..7), Some(1..=12))
        && matches!(num(8..10), Some(1..=31))
}

#[cfg(test)]
mod tests {
    use std::{io::ErrorKind, path::Path, process::Command};

    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn embedded_data_parses() {
        let table = Table::parse(DATA).unwrap_or_else(|e| panic!("core/data/cdn-ranges.txt: {e}"));
        assert!(is_date(table.date));
        assert_eq!(data_date(), table.date);
        let providers: std::collections::BTreeSet<_> = table.v4.iter().map(|s| s.provider).collect();
        for p in ["akamai", "azure-frontdoor", "cloudflare", "cloudfront", "fastly", "imperva", "sucuri"] {
            assert!(providers.contains(p), "no {p} ranges");
        }
        assert!(table.v6.iter().any(|s| s.provider == "cloudfront"));
    }

    #[test]
    fn known_addresses() {
        for (addr, want) in [
            ("104.16.0.1", "cloudflare"),
            ("104.16.0.0", "cloudflare"),
            ("104.27.255.255", "cloudflare"), // 104.16.0.0/13 and 104.24.0.0/14 merge
            ("2606:4700::1", "cloudflare"),
            ("13.32.0.1", "cloudfront"),
            ("2600:9000:1000::1", "cloudfront"),
            ("151.101.1.1", "fastly"),
            ("2a04:4e42::1", "fastly"),
            ("23.32.0.1", "akamai"),
            ("45.60.0.1", "imperva"),
            ("192.124.249.1", "sucuri"),
            ("13.107.246.1", "azure-frontdoor"),
        ] {
            assert_eq!(provider(ip(addr)), Some(want), "{addr}");
        }
    }

    #[test]
    fn other_addresses_are_no_cdn() {
        for addr in ["192.0.2.1", "127.0.0.1", "10.0.0.1", "104.28.0.0", "::1", "2001:db8::1", "0.0.0.0"] {
            assert_eq!(provider(ip(addr)), None, "{addr}");
        }
    }

    #[test]
    fn ipv4_mapped_is_looked_up_as_ipv4() {
        assert_eq!(provider(ip("::ffff:104.16.0.1")), Some("cloudflare"));
        assert_eq!(provider(ip("::ffff:192.0.2.1")), None);
    }

    #[test]
    fn overlapping_providers() {
        let t = Table::parse("# date: 2026-01-01\nwide 10.0.0.0/8\nnarrow 10.1.0.0/16\nmid 10.0.0.0/12\n").unwrap();
        assert_eq!(t.provider(ip("10.1.2.3")), Some("narrow"));
        assert_eq!(t.provider(ip("10.2.0.1")), Some("mid"));
        // Past the nearer spans' ends: only the scan back finds it.
        assert_eq!(t.provider(ip("10.200.0.1")), Some("wide"));
        // Same start: the narrower wins.
        assert_eq!(t.provider(ip("10.0.0.1")), Some("mid"));
        assert_eq!(t.provider(ip("11.0.0.0")), None);
        assert_eq!(t.provider(ip("9.255.255.255")), None);
    }

    #[test]
    fn one_providers_entries_merge() {
        let t = Table::parse("# date: 2026-01-01\na 10.0.0.0/25\na 10.0.0.128/25\na 10.0.0.0/24\nb ::/127\n").unwrap();
        assert_eq!(t.v4.len(), 1);
        assert_eq!((t.v4[0].lo, t.v4[0].hi), (0x0a00_0000, 0x0a00_00ff));
        assert_eq!(t.provider(ip("::1")), Some("b"));
        assert_eq!(t.provider(ip("::2")), None);
    }

    #[test]
    fn rejects_bad_data() {
        for (text, line, needle) in [
            ("a 10.0.0.0/8\n", 0, "no \"# date"),
            ("# date: 2026-01-01\n", 0, "no ranges"),
            ("# date: 2026-13-01\na 10.0.0.0/8\n", 1, "not a YYYY-MM-DD"),
            ("# date: 2026-01-01\n# date: 2026-01-02\n", 2, "second date"),
            ("# date: 2026-01-01\na 10.0.0.1/8\n", 2, "host bits"),
            ("# date: 2026-01-01\na 10.0.0.0/33\n", 2, "not a CIDR"),
            ("# date: 2026-01-01\na 10.0.0.0\n", 2, "not a CIDR"),
            ("# date: 2026-01-01\na\n", 2, "expected"),
            ("# date: 2026-01-01\na 10.0.0.0/8 x\n", 2, "expected"),
            ("# date: 2026-01-01\nCloud 10.0.0.0/8\n", 2, "provider names"),
        ] {
            let e = Table::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }

    #[test]
    fn policy_round_trips() {
        for p in [CdnPolicy::All, CdnPolicy::WebPorts, CdnPolicy::Skip] {
            assert_eq!(CdnPolicy::parse(p.as_str()), Ok(p));
        }
        assert_eq!(CdnPolicy::default(), CdnPolicy::All);
        let e = CdnPolicy::parse("exclude").unwrap_err();
        assert!(e.contains("\"exclude\"") && e.contains("all, web or skip"), "{e}");
    }

    /// The refresh script's own check of the data file (order, duplicates,
    /// a source line per provider). Needs python3; skipped without it.
    #[test]
    fn refresh_script_accepts_embedded_data() {
        let core = Path::new(env!("CARGO_MANIFEST_DIR"));
        let out = match Command::new("python3")
            .arg(core.join("../scripts/refresh-cdn-ranges.py"))
            .arg("--check")
            .arg(core.join("data/cdn-ranges.txt"))
            .output()
        {
            Ok(out) => out,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                eprintln!("python3 not found: skipping the refresh script's check");
                return;
            }
            Err(e) => panic!("running python3: {e}"),
        };
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}
