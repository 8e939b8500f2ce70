//! Sets of IP addresses kept as sorted, disjoint, inclusive ranges, so a /8
//! costs one entry, not sixteen million. The scan's index space, exclusions
//! and scope checks are all built on this.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use ipnet::{IpNet, Ipv4Net};

use crate::SpecError;

/// An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`) is the IPv4 host by
/// another name: targets, rules and own addresses are all compared in
/// their IPv4 form, so a deny of `a.b.c.d` also holds for its mapped
/// spelling.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// [`canonical_ip`] for blocks: an IPv6 block inside `::ffff:0:0/96` is
/// the IPv4 block it maps. Wider IPv6 blocks stay IPv6 (the mapped block
/// inside them stays on the built-in deny-list).
pub fn canonical_net(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(n) if n.prefix_len() >= 96 => match n.network().to_ipv4_mapped() {
            Some(v4) => Ipv4Net::new(v4, n.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
enum Family {
    V4,
    V6,
}

/// One inclusive range of one family.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrRange {
    family: Family,
    lo: u128,
    hi: u128,
}

fn split(ip: IpAddr) -> (Family, u128) {
    match ip {
        IpAddr::V4(v4) => (Family::V4, u128::from(u32::from(v4))),
        IpAddr::V6(v6) => (Family::V6, u128::from(v6)),
    }
}

fn join(family: Family, v: u128) -> IpAddr {
    match family {
        // Only values that came from a v4 address are stored under V4.
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

impl AddrRange {
    /// The inclusive range `lo..=hi`; `None` when the families differ or
    /// `lo > hi`. Two IPv4-mapped ends make an IPv4 range.
    pub fn new(lo: IpAddr, hi: IpAddr) -> Option<Self> {
        let (lo, hi) = match (canonical_ip(lo), canonical_ip(hi)) {
            (l @ IpAddr::V4(_), h @ IpAddr::V4(_)) => (l, h),
            _ => (lo, hi),
        };
        let (fl, l) = split(lo);
        let (fh, h) = split(hi);
        (fl == fh && l <= h).then_some(Self { family: fl, lo: l, hi: h })
    }

    /// One address, IPv4-mapped ones as IPv4.
    pub fn single(ip: IpAddr) -> Self {
        let (family, v) = split(canonical_ip(ip));
        Self { family, lo: v, hi: v }
    }

    pub fn from_net(net: IpNet) -> Self {
        let net = net.trunc();
        let (family, lo) = split(net.network());
        let (_, hi) = split(net.broadcast());
        Self { family, lo, hi }
    }

    pub fn first(&self) -> IpAddr {
        join(self.family, self.lo)
    }

    pub fn last(&self) -> IpAddr {
        join(self.family, self.hi)
    }

    /// Number of addresses, saturating at `u128::MAX` for `::/0`.
    pub fn len(&self) -> u128 {
        (self.hi - self.lo).saturating_add(1)
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let (f, v) = split(ip);
        f == self.family && self.lo <= v && v <= self.hi
    }

    pub fn is_ipv6(&self) -> bool {
        self.family == Family::V6
    }

    /// Parses the [`fmt::Display`] form: `ADDR` or `ADDR-ADDR`.
    pub fn parse(s: &str) -> Result<Self, SpecError> {
        let bad = || SpecError::Target { value: s.to_string(), reason: "not an address or address range".into() };
        match s.split_once('-') {
            Some((lo, hi)) => {
                let lo: IpAddr = lo.trim().parse().map_err(|_| bad())?;
                let hi: IpAddr = hi.trim().parse().map_err(|_| bad())?;
                Self::new(lo, hi).ok_or_else(bad)
            }
            None => Ok(Self::single(s.trim().parse().map_err(|_| bad())?)),
        }
    }
}

impl fmt::Display for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.lo == self.hi { write!(f, "{}", self.first()) } else { write!(f, "{}-{}", self.first(), self.last()) }
    }
}

impl fmt::Debug for AddrRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

/// A normalised set of addresses: sorted, merged ranges with prefix counts
/// for O(log n) indexing in both directions.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AddressSet {
    ranges: Vec<AddrRange>,
    /// `starts[i]` is the index of `ranges[i].lo` within the set.
    starts: Vec<u128>,
    len: u128,
}

impl AddressSet {
    pub fn new(ranges: impl IntoIterator<Item = AddrRange>) -> Self {
        let mut ranges: Vec<AddrRange> = ranges.into_iter().collect();
        ranges.sort_unstable();
        let mut merged: Vec<AddrRange> = Vec::with_capacity(ranges.len());
        for r in ranges {
            match merged.last_mut() {
                Some(last) if last.family == r.family && r.lo <= last.hi.saturating_add(1) => {
                    last.hi = last.hi.max(r.hi);
                }
                _ => merged.push(r),
            }
        }
        let mut starts = Vec::with_capacity(merged.len());
        let mut len = 0u128;
        for r in &merged {
            starts.push(len);
            len = len.saturating_add(r.len());
        }
        Self { ranges: merged, starts, len }
    }

    /// Parses the strings of [`AddressSet::to_strings`].
    pub fn parse_ranges<S: AsRef<str>>(items: &[S]) -> Result<Self, SpecError> {
        let ranges = items.iter().map(|s| AddrRange::parse(s.as_ref())).collect::<Result<Vec<_>, _>>()?;
        Ok(Self::new(ranges))
    }

    pub fn to_strings(&self) -> Vec<String> {
        self.ranges.iter().map(ToString::to_string).collect()
    }

    pub fn ranges(&self) -> &[AddrRange] {
        &self.ranges
    }

    /// Number of addresses, saturating at `u128::MAX`.
    pub fn len(&self) -> u128 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    pub fn has_ipv6(&self) -> bool {
        self.ranges.iter().any(AddrRange::is_ipv6)
    }

    /// The `i`-th address in ascending order (IPv4 before IPv6).
    pub fn nth(&self, i: u128) -> Option<IpAddr> {
        if i >= self.len {
            return None;
        }
        let r = self.starts.partition_point(|&s| s <= i) - 1;
        let range = &self.ranges[r];
        Some(join(range.family, range.lo + (i - self.starts[r])))
    }

    /// Inverse of [`AddressSet::nth`].
    pub fn index_of(&self, ip: IpAddr) -> Option<u128> {
        let (family, v) = split(ip);
        let r = self.ranges.partition_point(|range| (range.family, range.lo) <= (family, v)).checked_sub(1)?;
        let range = &self.ranges[r];
        (range.family == family && v <= range.hi).then(|| self.starts[r] + (v - range.lo))
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        self.index_of(ip).is_some()
    }

    /// The addresses of `self` that are not in `other`.
    pub fn subtract(&self, other: &AddressSet) -> AddressSet {
        let mut out = Vec::new();
        let mut j = 0;
        for r in &self.ranges {
            let mut lo = r.lo;
            let mut exhausted = false;
            // Skip exclusions entirely below this range.
            while j < other.ranges.len() && (other.ranges[j].family, other.ranges[j].hi) < (r.family, r.lo) {
                j += 1;
            }
            let mut k = j;
            while k < other.ranges.len() {
                let x = &other.ranges[k];
                if x.family != r.family || x.lo > r.hi {
                    break;
                }
                if x.lo > lo {
                    out.push(AddrRange { family: r.family, lo, hi: x.lo - 1 });
                }
                if x.hi >= r.hi {
                    exhausted = true;
                    break;
                }
                lo = lo.max(x.hi + 1);
                k += 1;
            }
            if !exhausted {
                out.push(AddrRange { family: r.family, lo, hi: r.hi });
            }
        }
        AddressSet::new(out)
    }

    /// The first range of `self` (clipped) that lies outside `allowed`.
    pub fn first_outside(&self, allowed: &AddressSet) -> Option<AddrRange> {
        self.subtract(allowed).ranges.first().copied()
    }

    /// Whether any address is in both sets.
    pub fn intersects(&self, other: &AddressSet) -> bool {
        self.subtract(other).len != self.len
    }
}

impl fmt::Debug for AddressSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.ranges).finish()
    }
}

impl FromIterator<AddrRange> for AddressSet {
    fn from_iter<T: IntoIterator<Item = AddrRange>>(iter: T) -> Self {
        Self::new(iter)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    fn v4(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn merges_and_indexes() {
        let set = AddressSet::new([
            AddrRange::from_net("10.0.0.0/30".parse().unwrap()),
            AddrRange::single(v4("10.0.0.4")),
            AddrRange::single(v4("10.0.0.2")),
            AddrRange::single(v4("2001:db8::1")),
            AddrRange::single(v4("192.168.1.1")),
        ]);
        assert_eq!(set.to_strings(), ["10.0.0.0-10.0.0.4", "192.168.1.1", "2001:db8::1"]);
        assert_eq!(set.len(), 7);
        assert_eq!(set.nth(5), Some(v4("192.168.1.1")));
        assert_eq!(set.nth(6), Some(v4("2001:db8::1")));
        assert_eq!(set.nth(7), None);
        assert_eq!(set.index_of(v4("10.0.0.3")), Some(3));
        assert_eq!(set.index_of(v4("10.0.0.5")), None);
        // An IPv6 address whose value equals an IPv4 one is not confused with it.
        assert_eq!(set.index_of(v4("::a00:1")), None);
        assert_eq!(AddressSet::parse_ranges(&set.to_strings()).unwrap(), set);
    }

    #[test]
    fn a_slash_eight_is_one_range() {
        let set = AddressSet::new([AddrRange::from_net("10.0.0.0/8".parse().unwrap())]);
        assert_eq!(set.ranges().len(), 1);
        assert_eq!(set.len(), 1 << 24);
        let all6 = AddressSet::new([AddrRange::from_net("::/0".parse().unwrap())]);
        assert_eq!(all6.len(), u128::MAX);
    }

    #[test]
    fn subtracts() {
        let set = AddressSet::new([AddrRange::from_net("10.0.0.0/24".parse().unwrap())]);
        let ex = AddressSet::new([
            AddrRange::from_net("10.0.0.0/26".parse().unwrap()),
            AddrRange::single(v4("10.0.0.100")),
            AddrRange::from_net("10.0.0.128/25".parse().unwrap()),
        ]);
        assert_eq!(set.subtract(&ex).to_strings(), ["10.0.0.64-10.0.0.99", "10.0.0.101-10.0.0.127"]);
        assert!(set.intersects(&ex));
        assert_eq!(set.first_outside(&ex).map(|r| r.to_string()), Some("10.0.0.64-10.0.0.99".to_string()));
    }

    fn arb_set() -> impl Strategy<Value = (AddressSet, BTreeSet<u32>)> {
        prop::collection::vec((0u32..600, 0u32..40), 0..8).prop_map(|items| {
            let naive: BTreeSet<u32> = items.iter().flat_map(|&(lo, w)| lo..=lo + w).collect();
            let set = AddressSet::new(
                items
                    .iter()
                    .map(|&(lo, w)| AddrRange::new(IpAddr::V4(lo.into()), IpAddr::V4((lo + w).into())).unwrap()),
            );
            (set, naive)
        })
    }

    proptest! {
        #[test]
        fn behaves_like_a_naive_set((set, naive) in arb_set()) {
            prop_assert_eq!(set.len(), naive.len() as u128);
            for (i, &v) in naive.iter().enumerate() {
                let ip = IpAddr::V4(v.into());
                prop_assert_eq!(set.nth(i as u128), Some(ip));
                prop_assert_eq!(set.index_of(ip), Some(i as u128));
            }
        }

        #[test]
        fn subtract_matches_naive((a, na) in arb_set(), (b, nb) in arb_set()) {
            let diff = a.subtract(&b);
            let expected: Vec<u32> = na.difference(&nb).copied().collect();
            let got: Vec<u32> = (0..diff.len())
                .map(|i| match diff.nth(i) { Some(IpAddr::V4(v)) => u32::from(v), _ => unreachable!() })
                .collect();
            prop_assert_eq!(got, expected);
        }
    }
}
