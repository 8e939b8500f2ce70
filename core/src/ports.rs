//! Port specs in naabu syntax (`80,443,8000-8100`, `top-100`, `top-1000`,
//! `full`) and the normalised set they denote.

use std::fmt;

use crate::{SpecError, top_ports};

/// A non-empty set of TCP ports, kept as sorted disjoint inclusive ranges so a
/// full 1-65535 spec costs one entry.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PortSet {
    ranges: Vec<(u16, u16)>,
    /// `ranges` prefix sums: `starts[i]` is the index of `ranges[i].0`.
    starts: Vec<u32>,
    len: u32,
}

impl PortSet {
    /// Parses a naabu-style spec. Items are separated by commas; each is a
    /// port, an inclusive range `a-b`, `top-100`, `top-1000`, `full` (or `-`,
    /// naabu's spelling of every port).
    pub fn parse(spec: &str) -> Result<Self, SpecError> {
        let bad = |reason: String| SpecError::Ports { value: spec.to_string(), reason };
        if spec.trim().is_empty() {
            return Err(bad("empty port spec".into()));
        }
        let mut ranges = Vec::new();
        for item in spec.split(',') {
            let item = item.trim();
            match item.to_ascii_lowercase().as_str() {
                "" => return Err(bad("empty item between commas".into())),
                "full" | "-" | "all" | "1-65535" => ranges.push((1, u16::MAX)),
                "top-100" | "top100" => ranges.extend(parse_ranges(top_ports::TOP_100)?),
                "top-1000" | "top1000" => ranges.extend(parse_ranges(top_ports::TOP_1000)?),
                other => ranges.push(parse_item(other).map_err(bad)?),
            }
        }
        Ok(Self::from_ranges(ranges))
    }

    /// The `--top-ports N` spelling: 100, 1000 or `full`.
    pub fn top(n: &str) -> Result<Self, SpecError> {
        match n.trim() {
            "100" => Self::parse("top-100"),
            "1000" => Self::parse("top-1000"),
            "full" | "65535" => Self::parse("full"),
            other => {
                Err(SpecError::Ports { value: other.to_string(), reason: "top ports must be 100, 1000 or full".into() })
            }
        }
    }

    fn from_ranges(mut ranges: Vec<(u16, u16)>) -> Self {
        ranges.sort_unstable();
        let mut merged: Vec<(u16, u16)> = Vec::with_capacity(ranges.len());
        for (lo, hi) in ranges {
            match merged.last_mut() {
                Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
                _ => merged.push((lo, hi)),
            }
        }
        let mut starts = Vec::with_capacity(merged.len());
        let mut len = 0u32;
        for &(lo, hi) in &merged {
            starts.push(len);
            len += u32::from(hi - lo) + 1;
        }
        Self { ranges: merged, starts, len }
    }

    /// Number of distinct ports (1..=65535).
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Always false: a parsed set has at least one port.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`-th port in ascending order.
    pub fn nth(&self, i: u32) -> Option<u16> {
        if i >= self.len {
            return None;
        }
        let r = self.starts.partition_point(|&s| s <= i) - 1;
        // In range by construction: `i - starts[r]` is below the range's length.
        Some(self.ranges[r].0 + (i - self.starts[r]) as u16)
    }

    /// Inverse of [`PortSet::nth`].
    pub fn index_of(&self, port: u16) -> Option<u32> {
        let r = self.ranges.partition_point(|&(lo, _)| lo <= port).checked_sub(1)?;
        let (lo, hi) = self.ranges[r];
        (port <= hi).then(|| self.starts[r] + u32::from(port - lo))
    }

    pub fn contains(&self, port: u16) -> bool {
        self.index_of(port).is_some()
    }

    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        self.ranges.iter().flat_map(|&(lo, hi)| lo..=hi)
    }

    /// The ports of `self` not in `other`; `None` when none are left (a
    /// set is never empty).
    pub fn subtract(&self, other: &PortSet) -> Option<PortSet> {
        let mut out = Vec::new();
        for &(lo, hi) in &self.ranges {
            let mut lo = u32::from(lo);
            let hi = u32::from(hi);
            for &(olo, ohi) in &other.ranges {
                let (olo, ohi) = (u32::from(olo), u32::from(ohi));
                if ohi < lo || olo > hi {
                    continue;
                }
                if olo > lo {
                    out.push((lo as u16, (olo - 1) as u16));
                }
                lo = ohi + 1;
                if lo > hi {
                    break;
                }
            }
            if lo <= hi {
                out.push((lo as u16, hi as u16));
            }
        }
        (!out.is_empty()).then(|| Self::from_ranges(out))
    }

    /// The ports in both; `None` when there are none.
    pub fn intersect(&self, other: &PortSet) -> Option<PortSet> {
        match self.subtract(other) {
            None => Some(self.clone()),
            Some(only_self) => self.subtract(&only_self),
        }
    }
}

fn parse_ranges(spec: &str) -> Result<Vec<(u16, u16)>, SpecError> {
    spec.split(',')
        .map(|item| parse_item(item).map_err(|reason| SpecError::Ports { value: spec.to_string(), reason }))
        .collect()
}

fn parse_item(item: &str) -> Result<(u16, u16), String> {
    if item.contains(':') {
        return Err(format!("{}: only TCP ports are supported", crate::text::echo(item)));
    }
    let (lo, hi) = match item.split_once('-') {
        Some((lo, hi)) => (parse_port(lo)?, parse_port(hi)?),
        None => {
            let p = parse_port(item)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("{}: range start is above its end", crate::text::echo(item)));
    }
    Ok((lo, hi))
}

fn parse_port(s: &str) -> Result<u16, String> {
    let s = s.trim();
    match s.parse::<u32>() {
        Ok(p) if (1..=65535).contains(&p) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is outside 1-65535")),
        Err(_) => Err(format!("{} is not a port number", crate::text::echo(s))),
    }
}

/// Canonical form: ascending, merged, e.g. `22,80,443,8000-8100`.
impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, &(lo, hi)) in self.ranges.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            if lo == hi {
                write!(f, "{lo}")?;
            } else {
                write!(f, "{lo}-{hi}")?;
            }
        }
        Ok(())
    }
}

impl fmt::Debug for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PortSet({self})")
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    #[test]
    fn parses_naabu_syntax() {
        let p = PortSet::parse("443, 80,8000-8002,81").unwrap();
        assert_eq!(p.to_string(), "80-81,443,8000-8002");
        assert_eq!(p.len(), 6);
        assert_eq!(PortSet::parse("full").unwrap().len(), 65535);
        assert_eq!(PortSet::parse("-").unwrap().len(), 65535);
        assert_eq!(PortSet::parse("top-100").unwrap().len(), 100);
        assert_eq!(PortSet::parse("top-1000").unwrap().len(), 1000);
        assert_eq!(PortSet::top("1000").unwrap().len(), 1000);
        let top = PortSet::parse("top-100").unwrap();
        for p in [21, 22, 23, 25, 80, 443, 3306, 3389, 8080] {
            assert!(top.contains(p), "top-100 lacks {p}");
        }
    }

    #[test]
    fn rejects_bad_specs_naming_the_value() {
        for (spec, needle) in [
            ("", "empty"),
            ("80,,81", "empty item"),
            ("0", "outside"),
            ("65536", "outside"),
            ("90-80", "above"),
            ("http", "not a port"),
            ("u:53", "only TCP"),
            ("80-", "not a port"),
            ("top-50", "not a port"),
        ] {
            let err = PortSet::parse(spec).unwrap_err().to_string();
            assert!(err.contains(needle), "{spec:?}: {err}");
        }
    }

    proptest! {
        #[test]
        fn matches_a_naive_set(items in prop::collection::vec((1u16..=65535, 0u16..300), 1..20)) {
            let spec = items
                .iter()
                .map(|&(lo, w)| {
                    let hi = lo.saturating_add(w);
                    if w == 0 { lo.to_string() } else { format!("{lo}-{hi}") }
                })
                .collect::<Vec<_>>()
                .join(",");
            let naive: BTreeSet<u16> = items
                .iter()
                .flat_map(|&(lo, w)| lo..=lo.saturating_add(w))
                .collect();
            let set = PortSet::parse(&spec).unwrap();
            prop_assert_eq!(set.len() as usize, naive.len());
            prop_assert_eq!(set.iter().collect::<Vec<_>>(), naive.iter().copied().collect::<Vec<_>>());
            for (i, &p) in naive.iter().enumerate() {
                prop_assert_eq!(set.nth(i as u32), Some(p));
                prop_assert_eq!(set.index_of(p), Some(i as u32));
            }
            // The canonical form parses back to the same set.
            prop_assert_eq!(PortSet::parse(&set.to_string()).unwrap(), set);
        }

        #[test]
        fn never_panics(spec in ".{0,40}") {
            let _ = PortSet::parse(&spec);
        }
    }

    #[test]
    fn subtracts_and_intersects() {
        let set = |s: &str| PortSet::parse(s).unwrap();
        assert_eq!(set("1-100").subtract(&set("1,50-60,100")).unwrap().to_string(), "2-49,61-99");
        assert_eq!(set("80,443").subtract(&set("1-65535")), None);
        assert_eq!(set("80,443").subtract(&set("22")).unwrap(), set("80,443"));
        assert_eq!(set("full").subtract(&set("65535")).unwrap().to_string(), "1-65534");
        assert_eq!(set("top-100").intersect(&set("80,443")).unwrap(), set("80,443"));
        assert_eq!(set("22,80").intersect(&set("80,443")).unwrap(), set("80"));
        assert_eq!(set("22").intersect(&set("80,443")), None);
    }
}
