//! Scope policy: which addresses may be probed at all. The controller
//! checks every scan against its policy when the scan is created; the
//! agent checks every assignment against its own, and the engine checks
//! each address again before it builds a packet (docs/security.md).
//!
//! An address is in scope when an allow entry covers it and no deny entry
//! does. The built-in deny-list (loopback, link-local, multicast, ...)
//! applies too, except where the operator allowed a range that lies
//! entirely inside one of its entries: allowing `127.0.0.1/32` is a
//! deliberate opt-in, allowing `0.0.0.0/0` is not. Operator deny entries
//! always win.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::{AddrRange, AddressSet, canonical_ip, canonical_net};

/// Never probed unless explicitly allowed (see the module docs).
pub const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",          // "this network"
    "127.0.0.0/8",        // loopback
    "169.254.0.0/16",     // link-local
    "224.0.0.0/4",        // multicast
    "255.255.255.255/32", // limited broadcast
    "::/128",             // unspecified
    "::1/128",            // loopback
    "::ffff:0:0/96",      // IPv4-mapped: an IPv4 address by another name
    "fe80::/10",          // link-local
    "ff00::/8",           // multicast
];

/// The built-in deny-list, parsed.
pub fn default_deny() -> Vec<IpNet> {
    DEFAULT_DENY.iter().map(|s| s.parse().expect("built-in CIDR")).collect()
}

/// The addresses a policy permits, precomputed as one [`AddressSet`], so
/// a check is a binary search; the rules are kept to say why an address
/// is refused.
#[derive(Clone, Debug)]
pub struct ScopePolicy {
    permitted: AddressSet,
    /// The operator's rules (canonical) and the built-in deny-list.
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    builtin: Vec<IpNet>,
}

/// Why a policy refuses an address: what a refusal names, so an operator
/// can find the rule to change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exclusion {
    /// There is no allow rule at all.
    NoAllowRule,
    /// No allow rule covers the address.
    NotAllowed,
    /// This deny rule of the operator covers it.
    Denied(IpNet),
    /// This entry of the built-in deny-list covers it, and no allow rule
    /// inside the entry opts into it.
    Builtin(IpNet),
}

fn everything() -> Vec<IpNet> {
    vec!["0.0.0.0/0".parse().expect("cidr"), "::/0".parse().expect("cidr")]
}

fn set(nets: &[IpNet]) -> AddressSet {
    AddressSet::new(nets.iter().map(|n| AddrRange::from_net(*n)))
}

impl ScopePolicy {
    /// `allow` and `deny` are the operator's; `builtin_deny` is
    /// [`default_deny`] plus, on a controller, its own addresses.
    ///
    /// Operator rules are compared in canonical form ([`canonical_net`]):
    /// an allow written as `::ffff:10.0.0.0/120` is `10.0.0.0/24`, so it
    /// can neither opt into the built-in IPv4-mapped entry nor slip past a
    /// deny of an IPv4 address.
    pub fn new(allow: &[IpNet], deny: &[IpNet], builtin_deny: &[IpNet]) -> Self {
        let allow: Vec<IpNet> = allow.iter().map(|n| canonical_net(*n)).collect();
        let deny: Vec<IpNet> = deny.iter().map(|n| canonical_net(*n)).collect();
        let (allow, deny) = (&allow[..], &deny[..]);
        let opted_in: Vec<IpNet> =
            allow.iter().filter(|a| builtin_deny.iter().any(|d| d.contains(*a))).copied().collect();
        let builtin = set(builtin_deny).subtract(&set(&opted_in));
        let denied = AddressSet::new(set(deny).ranges().iter().chain(builtin.ranges()).copied());
        Self {
            permitted: set(allow).subtract(&denied),
            allow: allow.to_vec(),
            deny: deny.to_vec(),
            builtin: builtin_deny.to_vec(),
        }
    }

    /// Why `ip` is out of scope (`None`: it is in scope). Rules are judged
    /// in the policy's order: an operator deny wins, then an address must
    /// be allowed, then the built-in deny-list applies.
    pub fn exclusion(&self, ip: IpAddr) -> Option<Exclusion> {
        if self.permits(ip) {
            return None;
        }
        // Raw and canonical: a mapped value is judged as its IPv4 self by
        // the operator's rules, but may lie inside a wide IPv6 allow too.
        let canonical = canonical_ip(ip);
        let covers = |n: &&IpNet| n.contains(&ip) || n.contains(&canonical);
        if let Some(d) = self.deny.iter().find(covers) {
            return Some(Exclusion::Denied(*d));
        }
        if self.allow.is_empty() {
            return Some(Exclusion::NoAllowRule);
        }
        if !self.allow.iter().any(|a| covers(&a)) {
            return Some(Exclusion::NotAllowed);
        }
        Some(self.builtin.iter().find(covers).map_or(Exclusion::NotAllowed, |b| Exclusion::Builtin(*b)))
    }

    /// Whether the operator gave any allow rule (a policy may permit
    /// nothing with some: its deny rules cover them).
    pub fn has_allow_rules(&self) -> bool {
        !self.allow.is_empty()
    }

    /// An agent's policy: `allow` (everything when empty) minus `deny` and
    /// the built-in deny-list.
    pub fn for_agent(allow: &[IpNet], deny: &[IpNet]) -> Self {
        let all = everything();
        Self::new(if allow.is_empty() { &all } else { allow }, deny, &default_deny())
    }

    /// Whether `ip` may be probed; an IPv4-mapped address is judged as the
    /// IPv4 address it names.
    pub fn permits(&self, ip: IpAddr) -> bool {
        self.permitted.contains(canonical_ip(ip))
    }

    /// The first range of `targets` (clipped) that is out of scope.
    pub fn first_offending(&self, targets: &AddressSet) -> Option<AddrRange> {
        targets.first_outside(&self.permitted)
    }

    /// Every address the policy does not permit (for the engine's
    /// per-probe check).
    pub fn denied(&self) -> AddressSet {
        set(&everything()).subtract(&self.permitted)
    }

    /// Whether nothing at all is permitted (an empty allow-list).
    pub fn is_empty(&self) -> bool {
        self.permitted.is_empty()
    }
}

/// A list of CIDR blocks as flags take them (`10.0.0.0/8,192.0.2.1`):
/// bare addresses are /32 (/128), host bits are dropped and IPv4-mapped
/// blocks are IPv4 ([`canonical_net`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CidrList(pub Vec<IpNet>);

impl std::str::FromStr for CidrList {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_cidrs(s).map(Self)
    }
}

impl std::fmt::Display for CidrList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, n) in self.0.iter().enumerate() {
            write!(f, "{}{n}", if i == 0 { "" } else { "," })?;
        }
        Ok(())
    }
}

impl std::ops::Deref for CidrList {
    type Target = [IpNet];

    fn deref(&self) -> &[IpNet] {
        &self.0
    }
}

/// Parses a comma-separated list of CIDRs (or bare addresses).
pub fn parse_cidrs(s: &str) -> Result<Vec<IpNet>, String> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<IpNet>()
                .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                .map(|n| canonical_net(n.trunc()))
                .map_err(|_| format!("{} is not a CIDR block or an address", crate::text::echo(p)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(s: &str) -> Vec<IpNet> {
        parse_cidrs(s).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn targets(s: &[&str]) -> AddressSet {
        set(&nets(&s.join(",")))
    }

    #[test]
    fn an_empty_allow_list_permits_nothing() {
        let p = ScopePolicy::new(&[], &[], &default_deny());
        assert!(p.is_empty());
        assert!(!p.permits(ip("192.0.2.1")));
        assert_eq!(p.first_offending(&targets(&["192.0.2.0/24"])).unwrap().to_string(), "192.0.2.0-192.0.2.255");
    }

    #[test]
    fn deny_wins_and_names_the_first_offending_range() {
        let p = ScopePolicy::new(&nets("10.0.0.0/8"), &nets("10.1.0.0/16"), &default_deny());
        assert!(p.permits(ip("10.0.0.1")));
        assert!(!p.permits(ip("10.1.2.3")));
        assert!(!p.permits(ip("11.0.0.1")));
        assert_eq!(p.first_offending(&targets(&["10.0.0.0/24"])), None);
        let bad = p.first_offending(&targets(&["10.0.255.0/24", "10.1.0.0/24"])).unwrap();
        assert_eq!(bad.to_string(), "10.1.0.0-10.1.0.255");
        let bad = p.first_offending(&targets(&["10.255.255.255", "11.0.0.0/30"])).unwrap();
        assert_eq!(bad.to_string(), "11.0.0.0-11.0.0.3");
    }

    #[test]
    fn a_refusal_names_the_rule_that_refuses() {
        let none = ScopePolicy::new(&[], &nets("10.0.0.0/8"), &default_deny());
        assert_eq!(none.exclusion(ip("192.0.2.1")), Some(Exclusion::NoAllowRule));
        assert!(!none.has_allow_rules());
        // Allowed and denied alike: the deny rule is named, not "nothing
        // allowed".
        let p = ScopePolicy::new(&nets("127.0.0.1/32,10.0.0.0/8"), &nets("127.0.0.1/32,10.1.0.0/16"), &default_deny());
        assert!(p.has_allow_rules());
        assert_eq!(p.exclusion(ip("127.0.0.1")), Some(Exclusion::Denied(nets("127.0.0.1/32")[0])));
        assert_eq!(p.exclusion(ip("10.1.2.3")), Some(Exclusion::Denied(nets("10.1.0.0/16")[0])));
        assert_eq!(p.exclusion(ip("::ffff:10.1.2.3")), Some(Exclusion::Denied(nets("10.1.0.0/16")[0])));
        assert_eq!(p.exclusion(ip("11.0.0.1")), Some(Exclusion::NotAllowed));
        assert_eq!(p.exclusion(ip("10.0.0.1")), None);
        let wide = ScopePolicy::new(&nets("0.0.0.0/0"), &[], &default_deny());
        assert_eq!(wide.exclusion(ip("127.0.0.2")), Some(Exclusion::Builtin(nets("127.0.0.0/8")[0])));
        let all_denied = ScopePolicy::new(&nets("127.0.0.1/32"), &nets("127.0.0.1/32"), &default_deny());
        assert!(all_denied.is_empty() && all_denied.has_allow_rules());
    }

    #[test]
    fn the_builtin_deny_list_yields_only_to_an_allow_inside_it() {
        let broad = ScopePolicy::for_agent(&[], &[]);
        for denied in ["127.0.0.1", "169.254.1.1", "224.0.0.1", "::1", "fe80::1", "ff02::1", "::ffff:127.0.0.1"] {
            assert!(!broad.permits(ip(denied)), "{denied}");
        }
        // A mapped address is its IPv4 self; as a raw IPv6 value (inside a
        // wider IPv6 range) it stays denied.
        assert!(broad.permits(ip("::ffff:10.0.0.1")) && broad.denied().contains(ip("::ffff:10.0.0.1")));
        assert!(broad.permits(ip("198.51.100.1")) && broad.permits(ip("2001:db8::1")));
        let opted = ScopePolicy::new(&nets("0.0.0.0/0,127.0.0.1/32"), &[], &default_deny());
        assert!(opted.permits(ip("127.0.0.1")));
        assert!(!opted.permits(ip("127.0.0.2")));
        // An operator deny beats an opt-in.
        let denied = ScopePolicy::new(&nets("127.0.0.0/8"), &nets("127.0.0.5"), &default_deny());
        assert!(denied.permits(ip("127.0.0.4")) && !denied.permits(ip("127.0.0.5")));
    }

    #[test]
    fn own_addresses_are_denied_like_the_builtins() {
        let own = [default_deny(), nets("203.0.113.7")].concat();
        let p = ScopePolicy::new(&nets("203.0.113.0/24"), &[], &own);
        assert!(!p.permits(ip("203.0.113.7")) && p.permits(ip("203.0.113.8")));
        assert_eq!(p.first_offending(&targets(&["203.0.113.0/24"])).unwrap().to_string(), "203.0.113.7");
    }

    #[test]
    fn mapped_addresses_are_judged_as_their_ipv4_selves() {
        let target = |s: &str| AddressSet::new([crate::TargetSpec::parse(s).unwrap().range().unwrap()]);
        // An allow written in mapped form neither opts into the built-in
        // mapped entry nor escapes an IPv4 deny.
        let p = ScopePolicy::new(&nets("::ffff:198.51.100.0/120"), &nets("198.51.100.77"), &default_deny());
        assert!(p.permits(ip("198.51.100.1")) && p.permits(ip("::ffff:198.51.100.1")));
        assert!(!p.permits(ip("::ffff:198.51.100.77")) && !p.permits(ip("198.51.100.77")));
        assert_eq!(p.first_offending(&target("::ffff:198.51.100.77")).unwrap().to_string(), "198.51.100.77");
        assert_eq!(p.first_offending(&target("::ffff:198.51.100.64/122")).unwrap().to_string(), "198.51.100.77");
        assert!(p.denied().contains(ip("198.51.100.77")));
        // Own addresses hold against their mapped spelling too.
        let own = [default_deny(), nets("203.0.113.7")].concat();
        let p = ScopePolicy::new(&nets("::ffff:0:0/96"), &[], &own);
        assert_eq!(p.first_offending(&target("::ffff:203.0.113.7")).unwrap().to_string(), "203.0.113.7");
        assert!(p.permits(ip("203.0.113.8")) && !p.permits(ip("::ffff:203.0.113.7")));
        // A wide IPv6 allow still never reaches mapped values inside it.
        let p = ScopePolicy::new(&nets("::/0"), &[], &default_deny());
        assert!(p.denied().contains(ip("::ffff:198.51.100.1")));
        assert!(p.first_offending(&target("::/64")).is_some());
    }

    #[test]
    fn denied_is_the_complement() {
        let p = ScopePolicy::new(&nets("10.0.0.0/8,2001:db8::/32"), &nets("10.9.0.0/16"), &default_deny());
        let d = p.denied();
        for a in ["10.0.0.1", "10.255.0.1", "2001:db8::5", "10.9.1.1", "11.0.0.0", "127.0.0.1", "::1", "2001:db9::"] {
            assert_ne!(p.permits(ip(a)), d.contains(ip(a)), "{a}");
        }
    }

    #[test]
    fn parses_lists() {
        assert_eq!(nets(" 10.0.0.0/8 , 192.0.2.1,::1 ").len(), 3);
        assert_eq!(nets("10.1.2.3/8")[0].to_string(), "10.0.0.0/8");
        assert!(parse_cidrs("10.0.0.0/33").is_err());
        assert!(parse_cidrs("example.com").is_err());
        assert_eq!(parse_cidrs("").unwrap(), vec![]);
        assert_eq!(nets("::ffff:10.1.2.0/120,::ffff:10.1.2.3")[..], nets("10.1.2.0/24,10.1.2.3/32")[..]);
        assert_eq!(nets("::ffff:0:0/96")[0].to_string(), "0.0.0.0/0");
        assert_eq!(nets("::/64")[0].to_string(), "::/64");
    }
}
