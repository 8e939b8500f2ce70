//! Property-based fuzzing of everything that parses untrusted text or
//! indexes the scan space: arbitrary input never panics, and whatever
//! parses prints back to something that parses to the same value.
//!
//! Run longer than CI does with, e.g.:
//!   PROPTEST_CASES=200000 cargo test -p portfleet-core --release --test fuzz

use std::collections::HashSet;

use std::net::{IpAddr, Ipv4Addr};

use portfleet_core::{
    AddrRange, AddressSet, PortSet, ScanSpace, ScopePolicy, TargetSpec,
    permutation::Permutation,
    policy::{default_deny, parse_cidrs},
};
use proptest::prelude::*;

/// Strings that look like what the parsers expect, mangled: far more
/// likely than uniform noise to reach deep branches.
fn near_miss() -> impl Strategy<Value = String> {
    let atoms = prop_oneof![
        Just("."),
        Just(":"),
        Just("::"),
        Just("/"),
        Just("-"),
        Just(","),
        Just(" "),
        Just("top-"),
        Just("full"),
        Just("0"),
        Just("255"),
        Just("65535"),
        Just("65536"),
        Just("4294967296"),
        Just("ffff"),
        Just("10.0.0.1"),
        Just("fe80::1"),
        Just("%eth0"),
        Just("[::1]"),
        Just("xn--"),
        Just("a.example"),
        Just("é"),
        Just("\0"),
        Just("\r\n"),
        Just("\u{1b}[2J"),
        Just("::ffff:"),
        Just("::ffff:10.0.0.1"),
        Just("/120"),
    ];
    prop::collection::vec(atoms, 0..12).prop_map(|v| v.concat())
}

fn input() -> impl Strategy<Value = String> {
    prop_oneof![near_miss(), any::<String>(), "[0-9a-f.:/,\\- ]{0,40}"]
}

proptest! {
    #[test]
    fn target_specs_never_panic_and_round_trip(s in input()) {
        if let Ok(t) = TargetSpec::parse(&s) {
            let again = TargetSpec::parse(&t.to_string()).expect("a printed target parses");
            prop_assert_eq!(again.to_string(), t.to_string());
        }
    }

    #[test]
    fn port_sets_never_panic_and_round_trip(s in input()) {
        if let Ok(p) = PortSet::parse(&s) {
            let again = PortSet::parse(&p.to_string()).expect("a printed port set parses");
            prop_assert_eq!(again, p);
        }
    }

    #[test]
    fn ranges_and_cidr_lists_never_panic(s in input()) {
        if let Ok(r) = AddrRange::parse(&s) {
            prop_assert_eq!(AddrRange::parse(&r.to_string()).unwrap(), r);
        }
        let _ = parse_cidrs(&s);
        let _ = AddressSet::parse_ranges(&s.split(',').collect::<Vec<_>>());
    }

    /// Errors about bad input never carry a control character and stay
    /// short however long the input (they reach logs and clients).
    #[test]
    fn errors_echo_input_escaped_and_short(s in input(), pad in 0usize..5000) {
        let long = format!("{s}{}", "x".repeat(pad));
        for value in [&s, &long] {
            if let Err(e) = TargetSpec::parse(value) {
                let m = e.to_string();
                prop_assert!(!m.chars().any(char::is_control), "{:?}", m);
                prop_assert!(m.len() < 2000, "{} bytes", m.len());
            }
            if let Err(e) = PortSet::parse(value) {
                let m = e.to_string();
                prop_assert!(!m.chars().any(char::is_control), "{:?}", m);
                prop_assert!(m.len() < 2000, "{} bytes", m.len());
            }
        }
    }

    /// An IPv4 address and its IPv4-mapped IPv6 spelling are one host to
    /// every policy, however the rules are written.
    #[test]
    fn mapped_addresses_are_judged_as_ipv4(
        host in any::<u32>(),
        rules in prop::collection::vec((any::<u32>(), 0u8..=32, any::<bool>(), any::<bool>()), 0..6),
    ) {
        let v4 = Ipv4Addr::from(host);
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        let (mut allow, mut deny) = (Vec::new(), Vec::new());
        for (net, prefix, is_deny, write_mapped) in rules {
            let net = Ipv4Addr::from(net);
            let text = if write_mapped { format!("::ffff:{net}/{}", u32::from(prefix) + 96) } else { format!("{net}/{prefix}") };
            let parsed = parse_cidrs(&text).expect("valid rule");
            if is_deny { deny.extend(parsed) } else { allow.extend(parsed) }
        }
        let policy = ScopePolicy::new(&allow, &deny, &default_deny());
        prop_assert_eq!(policy.permits(IpAddr::V4(v4)), policy.permits(mapped));
        let as_target = |s: String| AddressSet::new([TargetSpec::parse(&s).unwrap().range().unwrap()]);
        prop_assert_eq!(
            policy.first_offending(&as_target(v4.to_string())),
            policy.first_offending(&as_target(format!("::ffff:{v4}")))
        );
        prop_assert_eq!(policy.denied().contains(IpAddr::V4(v4)), !policy.permits(mapped));
    }

    /// The permutation is a bijection for any size and seed.
    #[test]
    fn permutations_are_bijections(n in 1u64..3000, seed in any::<u64>()) {
        let p = Permutation::new(n, seed);
        let mut seen = HashSet::with_capacity(n as usize);
        for i in 0..n {
            let v = p.apply(i);
            prop_assert!(v < n);
            prop_assert!(seen.insert(v), "{} repeated", v);
        }
    }

    /// Every position of a space maps to a probe inside it, and back.
    #[test]
    fn spaces_index_every_probe_once(hosts in 1u32..64, first_port in 1u16..60000, ports in 1u16..40, seed in any::<u64>()) {
        let last = 0x0a00_0000 + hosts - 1;
        let addrs = AddressSet::new([AddrRange::new(
            std::net::Ipv4Addr::from(0x0a00_0000u32).into(),
            std::net::Ipv4Addr::from(last).into(),
        ).unwrap()]);
        let spec = format!("{first_port}-{}", first_port.saturating_add(ports - 1));
        let space = ScanSpace::new(addrs.clone(), PortSet::parse(&spec).unwrap(), seed, u64::MAX).unwrap();
        let mut seen = HashSet::new();
        for pos in 0..space.len() {
            let (ip, port) = space.probe_at(pos);
            prop_assert!(addrs.contains(ip));
            prop_assert!(seen.insert((ip, port)));
        }
        prop_assert_eq!(seen.len() as u64, u64::from(hosts) * u64::from(ports.min(65535 - first_port + 1)));
    }
}
