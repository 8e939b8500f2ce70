//! Scan planning: a pure function from resolved targets and ports to the
//! index space, its shards and the hostname of each named address. DNS
//! happens before (in the controller), so this is deterministic and
//! property-tested.

use std::{collections::BTreeMap, net::IpAddr};

use crate::{
    SpecError,
    addrs::{AddrRange, AddressSet},
    ports::PortSet,
    shard::{self, ShardPolicy, ShardRange},
    space::{Limited, ScanSpace},
};

/// A target after DNS: a range of addresses, with the name it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedTarget {
    pub range: AddrRange,
    pub hostname: Option<String>,
}

#[derive(Clone, Debug)]
pub struct PlanInput {
    pub targets: Vec<ResolvedTarget>,
    pub ports: PortSet,
    /// Addresses never to probe, whatever the targets say.
    pub exclude: AddressSet,
    pub seed: u64,
    pub max_probes: u64,
    pub shards: ShardPolicy,
    /// Addresses probed only on some ports (CDN edges, web ports only).
    pub limited: Option<Limited>,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub space: ScanSpace,
    pub shards: Vec<ShardRange>,
    /// Each named address with its names joined by ',', sorted by address.
    /// Bounded by the number of hostname targets, never by CIDR sizes.
    pub hostnames: Vec<(IpAddr, String)>,
}

pub fn plan(input: PlanInput) -> Result<Plan, SpecError> {
    let requested = AddressSet::new(input.targets.iter().map(|t| t.range));
    let addrs = requested.subtract(&input.exclude);
    if addrs.is_empty() {
        return Err(SpecError::Empty(if requested.is_empty() {
            "no addresses to scan".into()
        } else {
            "every target address is excluded".into()
        }));
    }
    let mut names: BTreeMap<IpAddr, Vec<&str>> = BTreeMap::new();
    for t in &input.targets {
        if let Some(name) = &t.hostname {
            let ip = t.range.first();
            if addrs.contains(ip) {
                names.entry(ip).or_default().push(name);
            }
        }
    }
    let hostnames = names
        .into_iter()
        .map(|(ip, mut n)| {
            n.sort_unstable();
            n.dedup();
            (ip, n.join(","))
        })
        .collect();
    let mut space = ScanSpace::new(addrs, input.ports, input.seed, input.max_probes)?;
    if let Some(limited) = input.limited {
        space = space.with_limited(limited);
    }
    let shards = shard::split(space.len(), input.shards);
    Ok(Plan { space, shards, hostnames })
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;
    use crate::targets::TargetSpec;

    fn target(s: &str) -> ResolvedTarget {
        ResolvedTarget { range: TargetSpec::parse(s).unwrap().range().unwrap(), hostname: None }
    }

    fn input(targets: Vec<ResolvedTarget>, ports: &str) -> PlanInput {
        PlanInput {
            targets,
            ports: PortSet::parse(ports).unwrap(),
            exclude: AddressSet::default(),
            seed: 9,
            max_probes: 1 << 32,
            shards: ShardPolicy::default(),
            limited: None,
        }
    }

    #[test]
    fn a_slash_eight_plans_without_expanding() {
        let p = plan(input(vec![target("10.0.0.0/8")], "80,443")).unwrap();
        assert_eq!(p.space.len(), 2 << 24);
        assert_eq!(p.shards.len(), 2048);
        assert_eq!(p.space.addresses().ranges().len(), 1);
    }

    #[test]
    fn enforces_the_cap() {
        let err = plan(input(vec![target("10.0.0.0/8")], "full")).unwrap_err();
        assert_eq!(err.to_string(), "scan of 1099494850560 probes exceeds the maximum of 4294967296");
        let err = plan(input(vec![target("2001:db8::/32")], "80")).unwrap_err();
        assert!(err.to_string().contains("exceeds the maximum"), "{err}");
    }

    #[test]
    fn keeps_hostnames_and_excludes() {
        let mut i = input(
            vec![
                ResolvedTarget {
                    range: AddrRange::single("10.0.0.5".parse().unwrap()),
                    hostname: Some("b.example".into()),
                },
                ResolvedTarget {
                    range: AddrRange::single("10.0.0.5".parse().unwrap()),
                    hostname: Some("a.example".into()),
                },
                ResolvedTarget {
                    range: AddrRange::single("10.0.0.9".parse().unwrap()),
                    hostname: Some("gone.example".into()),
                },
                target("10.0.0.0/28"),
            ],
            "22",
        );
        i.exclude = AddressSet::new([AddrRange::single("10.0.0.9".parse().unwrap())]);
        let p = plan(i).unwrap();
        assert_eq!(p.space.len(), 15);
        assert_eq!(p.hostnames, vec![("10.0.0.5".parse().unwrap(), "a.example,b.example".to_string())]);
        let mut all = input(vec![target("10.0.0.9")], "22");
        all.exclude = AddressSet::new([AddrRange::single("10.0.0.9".parse().unwrap())]);
        assert_eq!(plan(all).unwrap_err().to_string(), "every target address is excluded");
    }

    proptest! {
        /// Every (address, port) pair lands in exactly one shard, exactly once.
        #[test]
        fn every_pair_in_exactly_one_shard(
            nets in prop::collection::vec((0u32..2000, 0u32..20), 1..5),
            ports in prop::collection::vec(1u16..2000, 1..12),
            seed in any::<u64>(),
            min in 1u64..200,
        ) {
            let targets: Vec<_> = nets
                .iter()
                .map(|&(lo, w)| ResolvedTarget {
                    range: AddrRange::new(IpAddr::V4(lo.into()), IpAddr::V4((lo + w).into())).unwrap(),
                    hostname: None,
                })
                .collect();
            let spec = ports.iter().map(u16::to_string).collect::<Vec<_>>().join(",");
            let mut inp = input(targets.clone(), &spec);
            inp.seed = seed;
            inp.shards = ShardPolicy { min_shard_probes: min, max_shards: 64 };
            let p = plan(inp).unwrap();
            let mut expected = HashSet::new();
            for t in &targets {
                for a in 0..t.range.len() {
                    let IpAddr::V4(first) = t.range.first() else { unreachable!() };
                    let ip = IpAddr::V4((u32::from(first) + a as u32).into());
                    for &port in &ports {
                        expected.insert((ip, port));
                    }
                }
            }
            let mut seen = HashSet::new();
            for s in &p.shards {
                for pos in s.start..s.end {
                    let probe = p.space.probe_at(pos);
                    prop_assert!(seen.insert(probe), "{:?} probed twice", probe);
                    prop_assert_eq!(p.space.position_of(probe.0, probe.1), Some(pos));
                }
            }
            prop_assert_eq!(seen, expected);
        }
    }
}
