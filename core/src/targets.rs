//! Target specs as users write them: an address, a CIDR block, an address
//! range (masscan's `10.0.0.1-10.0.0.9`) or a hostname.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;

use crate::{
    SpecError,
    addrs::{AddrRange, AddressSet},
};

#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum TargetSpec {
    Address(IpAddr),
    Cidr(IpNet),
    Range(AddrRange),
    /// Lowercase, without a trailing dot.
    Hostname(String),
}

impl TargetSpec {
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let t = s.trim();
        let bad = |reason: &str| SpecError::Target { value: s.to_string(), reason: reason.to_string() };
        if t.is_empty() {
            return Err(bad("empty target"));
        }
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(Self::Address(crate::canonical_ip(ip)));
        }
        if t.contains('/') {
            let net = crate::canonical_net(IpNet::from_str(t).map_err(|_| bad("not a valid CIDR block"))?);
            // A single-address block is an address; host bits are dropped as
            // masscan and nmap do.
            return Ok(if net.prefix_len() == net.max_prefix_len() {
                Self::Address(net.addr())
            } else {
                Self::Cidr(net.trunc())
            });
        }
        if t.contains('-') && t.split_once('-').is_some_and(|(a, _)| a.trim().parse::<IpAddr>().is_ok()) {
            return AddrRange::parse(t)
                .map(Self::Range)
                .map_err(|_| bad("not a valid address range (start must not exceed end, same family)"));
        }
        if t.contains(':') {
            return Err(bad("not a valid IPv6 address (and hostnames cannot contain ':')"));
        }
        if t.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return Err(bad("not a valid IPv4 address"));
        }
        validate_hostname(t).map_err(|r| bad(&r))?;
        Ok(Self::Hostname(t.trim_end_matches('.').to_ascii_lowercase()))
    }

    /// The addresses this spec denotes without DNS, or `None` for a hostname.
    pub fn range(&self) -> Option<AddrRange> {
        match self {
            Self::Address(ip) => Some(AddrRange::single(*ip)),
            Self::Cidr(net) => Some(AddrRange::from_net(*net)),
            Self::Range(r) => Some(*r),
            Self::Hostname(_) => None,
        }
    }

    pub fn kind(&self) -> TargetKind {
        match self {
            Self::Address(_) => TargetKind::Address,
            Self::Cidr(_) => TargetKind::Cidr,
            Self::Range(_) => TargetKind::Range,
            Self::Hostname(_) => TargetKind::Hostname,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum TargetKind {
    Address,
    Cidr,
    Range,
    Hostname,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Address => "address",
            Self::Cidr => "cidr",
            Self::Range => "range",
            Self::Hostname => "hostname",
        }
    }
}

impl FromStr for TargetSpec {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Address(ip) => write!(f, "{ip}"),
            Self::Cidr(net) => write!(f, "{net}"),
            Self::Range(r) => write!(f, "{r}"),
            Self::Hostname(h) => f.write_str(h),
        }
    }
}

/// RFC 1123 names; underscores are allowed because real DNS has them.
fn validate_hostname(name: &str) -> Result<(), String> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.len() > 253 {
        return Err("hostname longer than 253 characters".into());
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("hostname has an empty label".into());
        }
        if label.len() > 63 {
            return Err("hostname label longer than 63 characters".into());
        }
        if !label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
            return Err("not an address, CIDR block or hostname".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("hostname label starts or ends with '-'".into());
        }
    }
    Ok(())
}

/// Builds an [`AddressSet`] from specs that carry no hostname, e.g. the
/// agent's `--exclude` list or a scope policy.
pub fn parse_cidr_list<S: AsRef<str>>(items: &[S]) -> Result<AddressSet, SpecError> {
    let mut ranges = Vec::with_capacity(items.len());
    for item in items {
        let spec = TargetSpec::parse(item.as_ref())?;
        ranges.push(spec.range().ok_or_else(|| SpecError::Target {
            value: item.as_ref().to_string(),
            reason: "a hostname is not allowed here; give an address or CIDR block".into(),
        })?);
    }
    Ok(AddressSet::new(ranges))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_each_kind() {
        let p = |s: &str| TargetSpec::parse(s).unwrap().to_string();
        assert_eq!(p(" 10.0.0.1 "), "10.0.0.1");
        assert_eq!(p("10.0.0.77/24"), "10.0.0.0/24");
        assert_eq!(p("10.0.0.7/32"), "10.0.0.7");
        assert_eq!(p("2001:db8::/64"), "2001:db8::/64");
        assert_eq!(p("::1"), "::1");
        assert_eq!(p("10.0.0.1-10.0.0.9"), "10.0.0.1-10.0.0.9");
        assert_eq!(p("Example.COM."), "example.com");
        assert_eq!(p("localhost"), "localhost");
        assert_eq!(p("_srv.example.com"), "_srv.example.com");
        assert_eq!(TargetSpec::parse("db-1.internal").unwrap().kind(), TargetKind::Hostname);
    }

    #[test]
    fn rejects_bad_targets_naming_them() {
        for bad in [
            "",
            "10.0.0.300",
            "10.0.0.0/33",
            "10.0.0.9-10.0.0.1",
            "10.0.0.1-::1",
            "http://example.com",
            "exa mple.com",
            "-bad.example.com",
            "a..b",
            "1.2.3",
            "fe80::zz",
        ] {
            let err = TargetSpec::parse(bad).unwrap_err().to_string();
            assert!(err.contains(&format!("\"{bad}\"")), "{bad:?}: {err}");
        }
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,60}") {
            let _ = TargetSpec::parse(&s);
        }

        #[test]
        fn display_round_trips(a in any::<u32>(), len in 0u8..=32) {
            let spec = TargetSpec::parse(&format!("{}/{len}", std::net::Ipv4Addr::from(a))).unwrap();
            prop_assert_eq!(TargetSpec::parse(&spec.to_string()).unwrap(), spec);
        }
    }
}
