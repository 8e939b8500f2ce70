//! Which way probes leave: the kernel's IPv4 routes (`/proc/net/route`),
//! its neighbour cache (`/proc/net/arp`), the source address it would
//! pick, and whether global IPv6 space is reachable at all
//! (`/proc/net/ipv6_route`, `/proc/net/if_inet6`: [`ipv6_reach`]). Parsing
//! is pure and tested on captured tables.

use std::{
    fmt, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
};

use portfleet_core::AddrRange;

use super::NetOptions;

/// One row of the main IPv4 routing table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route4 {
    pub iface: String,
    pub dest: u32,
    pub mask: u32,
    pub gateway: Option<Ipv4Addr>,
    pub metric: u32,
}

impl Route4 {
    fn prefix_len(&self) -> u32 {
        self.mask.count_ones()
    }

    fn contains(&self, ip: u32) -> bool {
        ip & self.mask == self.dest
    }

    /// Whether any address of `[lo, hi]` is in this route's prefix.
    fn overlaps(&self, lo: u32, hi: u32) -> bool {
        let first = self.dest;
        let last = self.dest | !self.mask;
        first <= hi && lo <= last
    }
}

/// Parses `/proc/net/route`: hex fields hold network-order bytes printed
/// as a host (little-endian) integer.
pub fn parse_routes(text: &str) -> Vec<Route4> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    let hex = |s: &str| u32::from_str_radix(s, 16).ok();
    let addr = |v: u32| u32::from_be_bytes(v.to_le_bytes());
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let flags = hex(f[3])?;
            if flags & RTF_UP == 0 {
                return None;
            }
            let gateway = addr(hex(f[2])?);
            Some(Route4 {
                iface: f[0].to_string(),
                dest: addr(hex(f[1])?),
                mask: addr(hex(f[7])?),
                gateway: (flags & RTF_GATEWAY != 0 && gateway != 0).then(|| Ipv4Addr::from(gateway)),
                metric: f[6].parse().ok()?,
            })
        })
        .collect()
}

/// Longest-prefix match, lowest metric first among equals.
pub fn lookup(routes: &[Route4], ip: Ipv4Addr) -> Option<&Route4> {
    let ip = u32::from(ip);
    routes.iter().filter(|r| r.contains(ip)).min_by_key(|r| (std::cmp::Reverse(r.prefix_len()), r.metric))
}

/// The route every address of `range` takes, if it is one route: the
/// route of its first address covers all of it and no more specific route
/// overlaps it.
pub fn uniform_route<'a>(routes: &'a [Route4], range: &AddrRange) -> Option<&'a Route4> {
    let (IpAddr::V4(first), IpAddr::V4(last)) = (range.first(), range.last()) else {
        return None;
    };
    let (lo, hi) = (u32::from(first), u32::from(last));
    let route = lookup(routes, first)?;
    if !route.contains(hi) {
        return None;
    }
    let shadowed = routes.iter().any(|r| r.prefix_len() > route.prefix_len() && r.overlaps(lo, hi));
    (!shadowed).then_some(route)
}

/// Complete entries of `/proc/net/arp` for `iface`: (address, MAC).
pub fn parse_arp(text: &str, iface: &str) -> Vec<(Ipv4Addr, [u8; 6])> {
    const ATF_COM: u32 = 0x2;
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 || f[5] != iface {
                return None;
            }
            let flags = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).ok()?;
            if flags & ATF_COM == 0 {
                return None;
            }
            Some((f[0].parse().ok()?, parse_mac(f[3])?))
        })
        .collect()
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        *byte = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    (parts.next().is_none() && mac != [0; 6]).then_some(mac)
}

/// The source address the kernel would use toward `dst`. Connecting a UDP
/// socket only consults the routing table: no packet is sent.
pub fn source_address(dst: IpAddr) -> io::Result<IpAddr> {
    let bind = if dst.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = UdpSocket::bind(bind)?;
    sock.connect((dst, 9))?;
    Ok(sock.local_addr()?.ip())
}

/// One IPv6 route of any table (`/proc/net/ipv6_route` lists them all).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route6 {
    pub iface: String,
    pub dest: Ipv6Addr,
    pub prefix_len: u8,
    /// `RTF_*` flags as the kernel prints them.
    pub flags: u32,
}

impl Route6 {
    const RTF_UP: u32 = 0x0001;
    /// Set for unreachable, prohibit, blackhole and throw routes.
    const RTF_REJECT: u32 = 0x0200;
    const RTF_ANYCAST: u32 = 0x0010_0000;
    const RTF_LOCAL: u32 = 0x8000_0000;

    /// Up, and sends packets away rather than refusing or keeping them.
    fn forwards(&self) -> bool {
        self.flags & Self::RTF_UP != 0
            && self.flags & (Self::RTF_REJECT | Self::RTF_ANYCAST | Self::RTF_LOCAL) == 0
            && self.iface != "lo"
    }

    /// Whether this route's prefix and global unicast space (2000::/3)
    /// share addresses: it covers them (`::/0`) or lies inside them.
    fn overlaps_global_unicast(&self) -> bool {
        let bits = u32::from(self.prefix_len.min(3));
        let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
        (u128::from(self.dest) & mask) == ((0x2000u128 << 112) & mask)
    }
}

impl fmt::Display for Route6 {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} dev {}", self.dest, self.prefix_len, self.iface)
    }
}

/// 32 hex digits, as `/proc/net/ipv6_route` and `if_inet6` print addresses.
fn hex_ipv6(s: &str) -> Option<Ipv6Addr> {
    (s.len() == 32).then(|| u128::from_str_radix(s, 16).ok()).flatten().map(Ipv6Addr::from)
}

/// Parses `/proc/net/ipv6_route` (no header: destination, prefix length,
/// source, source length, next hop, metric, refcount, use, flags, device).
/// Lines that do not parse are skipped.
pub fn parse_routes6(text: &str) -> Vec<Route6> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 10 {
                return None;
            }
            let prefix_len = u8::from_str_radix(f[1], 16).ok().filter(|l| *l <= 128)?;
            Some(Route6 {
                iface: f[9].to_string(),
                dest: hex_ipv6(f[0])?,
                prefix_len,
                flags: u32::from_str_radix(f[8], 16).ok()?,
            })
        })
        .collect()
}

/// One address of `/proc/net/if_inet6`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Addr6 {
    pub iface: String,
    pub addr: Ipv6Addr,
    /// `IFA_F_*` flags.
    pub flags: u32,
}

impl Addr6 {
    const IFA_F_DADFAILED: u32 = 0x08;

    /// An address probes could come from: on a real interface, not
    /// loopback, link-local or multicast, and not refused by duplicate
    /// address detection (a tentative one will be usable in a moment).
    fn is_global_source(&self) -> bool {
        let a = self.addr;
        self.iface != "lo"
            && self.flags & Self::IFA_F_DADFAILED == 0
            && !(a.is_loopback() || a.is_unspecified() || a.is_multicast() || a.is_unicast_link_local())
    }
}

/// Parses `/proc/net/if_inet6` (address, ifindex, prefix length, scope,
/// flags, device). Lines that do not parse are skipped.
pub fn parse_addrs6(text: &str) -> Vec<Addr6> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 6 {
                return None;
            }
            Some(Addr6 { iface: f[5].to_string(), addr: hex_ipv6(f[0])?, flags: u32::from_str_radix(f[4], 16).ok()? })
        })
        .collect()
}

/// Whether this host can send to global IPv6 unicast space, and why (not).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ipv6Reach {
    Reachable {
        route: Route6,
        address: Ipv6Addr,
    },
    /// No route that forwards into 2000::/3 (on `interface`, if one is set).
    NoRoute {
        interface: Option<String>,
    },
    /// Routes, but no address to send from.
    NoAddress {
        interface: Option<String>,
        source: Option<Ipv6Addr>,
    },
    /// The kernel's tables could not be read (IPv6 disabled, no /proc).
    Unknown {
        reason: String,
    },
}

impl Ipv6Reach {
    pub fn is_reachable(&self) -> bool {
        matches!(self, Self::Reachable { .. })
    }
}

impl fmt::Display for Ipv6Reach {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let on = |i: &Option<String>| i.as_ref().map(|i| format!(" on {i}")).unwrap_or_default();
        match self {
            Self::Reachable { route, address } => write!(f, "route {route}, address {address}"),
            Self::NoRoute { interface } => write!(f, "no route to global IPv6 space{}", on(interface)),
            Self::NoAddress { interface, source: Some(s) } => {
                write!(f, "--source-ip {s} is not a global IPv6 address of this host{}", on(interface))
            }
            Self::NoAddress { interface, source: None } => {
                write!(f, "no IPv6 address beyond loopback and link-local{}", on(interface))
            }
            Self::Unknown { reason } => write!(f, "{reason}"),
        }
    }
}

/// Decides [`Ipv6Reach`] from the parsed tables: a route that forwards
/// into 2000::/3 (a default route, or a prefix inside it) and an address
/// that is neither loopback nor link-local, both on `opts.interface` when
/// one is set; an IPv6 `opts.source_ip` must be one of those addresses
/// (an IPv4 one leaves IPv6 to the kernel's choice).
pub fn ipv6_reach(routes: &[Route6], addrs: &[Addr6], opts: &NetOptions) -> Ipv6Reach {
    let interface = opts.interface.as_deref();
    let on_interface = |iface: &str| interface.is_none_or(|i| i == iface);
    let Some(route) = routes.iter().find(|r| r.forwards() && r.overlaps_global_unicast() && on_interface(&r.iface))
    else {
        return Ipv6Reach::NoRoute { interface: opts.interface.clone() };
    };
    let source = match opts.source_ip {
        Some(IpAddr::V6(s)) => Some(s),
        _ => None,
    };
    let address = addrs
        .iter()
        .filter(|a| a.is_global_source() && on_interface(&a.iface))
        .map(|a| a.addr)
        .find(|a| source.is_none_or(|s| s == *a));
    match address {
        Some(address) => Ipv6Reach::Reachable { route: route.clone(), address },
        None => Ipv6Reach::NoAddress { interface: opts.interface.clone(), source },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
veth0\t0000C90A\t0200C80A\t0003\t0\t0\t0\t00FFFFFF\t0\t0\t0
veth0\t8000C90A\t0300C80A\t0003\t0\t0\t0\t80FFFFFF\t0\t0\t0
eth1\t0000000A\t00000000\t0000\t0\t0\t0\t000000FF\t0\t0\t0
";

    #[test]
    fn parses_and_matches_routes() {
        let routes = parse_routes(ROUTES);
        // The last row is not up.
        assert_eq!(routes.len(), 4);
        assert_eq!(routes[0].gateway, Some(Ipv4Addr::new(192, 0, 2, 1)));
        assert_eq!(routes[1].gateway, None);
        let r = lookup(&routes, "10.201.0.5".parse().unwrap()).unwrap();
        assert_eq!((r.iface.as_str(), r.gateway), ("veth0", Some(Ipv4Addr::new(10, 200, 0, 2))));
        let r = lookup(&routes, "10.201.0.200".parse().unwrap()).unwrap();
        assert_eq!(r.gateway, Some(Ipv4Addr::new(10, 200, 0, 3)));
        assert_eq!(lookup(&routes, "8.8.8.8".parse().unwrap()).unwrap().iface, "eth0");
    }

    #[test]
    fn a_range_split_across_routes_is_not_uniform() {
        let routes = parse_routes(ROUTES);
        let range = |a: &str, b: &str| AddrRange::new(a.parse().unwrap(), b.parse().unwrap()).unwrap();
        let low = uniform_route(&routes, &range("10.201.0.0", "10.201.0.127")).unwrap();
        assert_eq!(low.gateway, Some(Ipv4Addr::new(10, 200, 0, 2)));
        assert!(uniform_route(&routes, &range("10.201.0.0", "10.201.0.255")).is_none());
        assert!(uniform_route(&routes, &range("10.200.255.0", "10.201.0.3")).is_none());
    }

    #[test]
    fn parses_complete_arp_entries() {
        let arp = "IP address       HW type     Flags       HW address            Mask     Device
192.0.2.1        0x1         0x2         02:fc:00:00:00:05     *        eth0
192.0.2.9        0x1         0x0         00:00:00:00:00:00     *        eth0
10.200.0.2       0x1         0x2         42:b7:76:f6:fc:07     *        veth0
";
        assert_eq!(parse_arp(arp, "eth0"), vec![(Ipv4Addr::new(192, 0, 2, 1), [0x02, 0xfc, 0, 0, 0, 5])]);
        assert_eq!(parse_arp(arp, "veth0").len(), 1);
        assert_eq!(parse_mac("zz:00:00:00:00:01"), None);
    }

    // Captured from namespaces (`ip netns exec ... cat /proc/net/...`).
    /// Loopback and a veth with IPv6 link-local only: what an IPv4-only
    /// host looks like, the kernel's own `::/0 dev lo` reject route included.
    const LINK_LOCAL_ROUTES: &str = "\
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001      pfb
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
00000000000000000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001       lo
fe800000000000005cfe61fffe033381 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000003 00000000 80200001      pfb
ff000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000003 00000000 00000001      pfb
";
    const LINK_LOCAL_ADDRS: &str = "\
fe800000000000005cfe61fffe033381 02 40 20 80      pfb
00000000000000000000000000000001 01 80 10 80       lo
";
    /// Unreachable 2001:db8::/32, blackhole ::/0, prohibit 2001:db8:1::/48,
    /// and a global /128 with no prefix route (so only its local route).
    const REJECT_ROUTES: &str = "\
20010db8000100000000000000000000 30 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00200200       lo
20010db8000000000000000000000000 20 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00200200       lo
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001      pfa
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 00000400 00000001 00000000 00200200       lo
20010db8007600000000000000000001 80 00000000000000000000000000000000 00 00000000000000000000000000000000 00000000 00000002 00000000 80200001      pfa
";
    const GLOBAL_ADDRS: &str = "\
fe800000000000005cfe61fffe033381 02 40 20 80      pfb
20010db8007600000000000000000001 03 80 00 82      pfa
00000000000000000000000000000001 01 80 10 80       lo
";
    /// The test topology's scanner side: 2001:db8:76::/64 on-link and
    /// 2001:db8:77:1::/120 via a gateway, no default route.
    const SLASH_120_ROUTES: &str = "\
20010db8007600000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000002 00000000 00000001      pfb
20010db8007700010000000000000000 78 00000000000000000000000000000000 00 20010db8007600000000000000000002 00000400 00000001 00000000 00000003      pfb
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";
    const SLASH_120_ADDRS: &str = "\
20010db8007600000000000000000001 03 40 00 80      pfb
fe800000000000005cfe61fffe033381 02 40 20 80      pfb
";
    /// A plain host: default route via a router on eth0.
    const DEFAULT_ROUTES: &str = "\
fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000002 00000000 00000003     eth0
00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200       lo
";
    const DEFAULT_ADDRS: &str = "\
2a0100000000000000000000000000aa 02 40 00 00     eth0
fe800000000000005cfe61fffe033381 02 40 20 80     eth0
";

    fn reach(routes: &str, addrs: &str, opts: &NetOptions) -> Ipv6Reach {
        ipv6_reach(&parse_routes6(routes), &parse_addrs6(addrs), opts)
    }

    #[test]
    fn loopback_and_link_local_only_is_no_ipv6() {
        let r = reach(LINK_LOCAL_ROUTES, LINK_LOCAL_ADDRS, &NetOptions::default());
        assert_eq!(r, Ipv6Reach::NoRoute { interface: None });
        assert_eq!(r.to_string(), "no route to global IPv6 space");
        assert_eq!(parse_routes6(LINK_LOCAL_ROUTES).len(), 5);
        assert_eq!(parse_addrs6(LINK_LOCAL_ADDRS).len(), 2);
    }

    #[test]
    fn a_default_route_and_a_global_address_is_ipv6() {
        let r = reach(DEFAULT_ROUTES, DEFAULT_ADDRS, &NetOptions::default());
        assert!(r.is_reachable(), "{r}");
        assert_eq!(r.to_string(), "route ::/0 dev eth0, address 2a01::aa");
        // The route alone is not enough: link-local cannot reach the world.
        let r = reach(DEFAULT_ROUTES, LINK_LOCAL_ADDRS, &NetOptions::default());
        assert_eq!(r, Ipv6Reach::NoAddress { interface: None, source: None });
    }

    #[test]
    fn reject_blackhole_and_local_routes_are_no_ipv6() {
        let r = reach(REJECT_ROUTES, GLOBAL_ADDRS, &NetOptions::default());
        assert_eq!(r, Ipv6Reach::NoRoute { interface: None });
    }

    #[test]
    fn a_slash_120_inside_global_space_is_ipv6() {
        let r = reach(SLASH_120_ROUTES, SLASH_120_ADDRS, &NetOptions::default());
        let Ipv6Reach::Reachable { route, address } = r else { panic!("{r}") };
        assert_eq!((route.iface.as_str(), route.prefix_len), ("pfb", 64));
        assert_eq!(address, "2001:db8:76::1".parse::<Ipv6Addr>().unwrap());
        let only_120: String = SLASH_120_ROUTES.lines().skip(1).map(|l| format!("{l}\n")).collect();
        let r = reach(&only_120, SLASH_120_ADDRS, &NetOptions::default());
        assert_eq!(r.to_string(), "route 2001:db8:77:1::/120 dev pfb, address 2001:db8:76::1");
    }

    #[test]
    fn prefixes_outside_global_space_do_not_count() {
        // fd00::/8 (unique local) and 4000::/3 only touch other space.
        let routes = "\
fd000000000000000000000000000000 08 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
40000000000000000000000000000000 03 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0
";
        assert_eq!(reach(routes, DEFAULT_ADDRS, &NetOptions::default()), Ipv6Reach::NoRoute { interface: None });
        let covering = routes.replace("40000000000000000000000000000000 03", "00000000000000000000000000000000 01");
        assert!(reach(&covering, DEFAULT_ADDRS, &NetOptions::default()).is_reachable());
    }

    #[test]
    fn interface_and_source_options_narrow_the_answer() {
        let on = |i: &str| NetOptions { interface: Some(i.into()), source_ip: None };
        assert!(reach(DEFAULT_ROUTES, DEFAULT_ADDRS, &on("eth0")).is_reachable());
        let r = reach(DEFAULT_ROUTES, DEFAULT_ADDRS, &on("eth1"));
        assert_eq!(r.to_string(), "no route to global IPv6 space on eth1");
        // The route is on pfb, the only global address on pfa.
        assert!(reach(SLASH_120_ROUTES, GLOBAL_ADDRS, &NetOptions::default()).is_reachable());
        let r = reach(SLASH_120_ROUTES, GLOBAL_ADDRS, &on("pfb"));
        assert_eq!(r, Ipv6Reach::NoAddress { interface: Some("pfb".into()), source: None });

        let from = |ip: &str| NetOptions { interface: None, source_ip: Some(ip.parse().unwrap()) };
        assert!(reach(DEFAULT_ROUTES, DEFAULT_ADDRS, &from("2a01::aa")).is_reachable());
        // An IPv4 source says nothing about IPv6.
        assert!(reach(DEFAULT_ROUTES, DEFAULT_ADDRS, &from("192.0.2.7")).is_reachable());
        let r = reach(DEFAULT_ROUTES, DEFAULT_ADDRS, &from("2a01::bb"));
        assert_eq!(r.to_string(), "--source-ip 2a01::bb is not a global IPv6 address of this host");
    }

    #[test]
    fn bad_lines_are_skipped() {
        let routes = format!(
            "garbage\n\n{}\nzz000000000000000000000000000000 00 0 00 0 0 0 0 00000001 eth0\n\
             00000000000000000000000000000000 ff 0 00 0 0 0 0 00000001 eth0\n\
             0000000000000000000000000000000 00 0 00 0 0 0 0 00000001 eth0\n\
             00000000000000000000000000000000 00 0 00 0 0 0 0 xyz eth0\n",
            DEFAULT_ROUTES.lines().nth(1).unwrap()
        );
        assert_eq!(parse_routes6(&routes).len(), 1);
        let addrs = "2a01 02 40 00 00 eth0\nnot an address\n2a0100000000000000000000000000aa 02 40 00 zz eth0\n";
        assert!(parse_addrs6(addrs).is_empty());
    }

    proptest::proptest! {
        #[test]
        fn the_parsers_never_panic(text in "\\PC*") {
            let routes = parse_routes6(&text);
            let addrs = parse_addrs6(&text);
            let _ = ipv6_reach(&routes, &addrs, &NetOptions::default());
        }

        #[test]
        fn rows_of_hex_fields_never_panic(
            fields in proptest::collection::vec("[0-9a-f]{0,33}", 0..12),
            dev in "[a-z0-9]{1,15}",
        ) {
            let line = format!("{} {dev}", fields.join(" "));
            let _ = ipv6_reach(&parse_routes6(&line), &parse_addrs6(&line), &NetOptions::default());
        }
    }

    #[test]
    fn loopback_source_is_loopback() {
        assert_eq!(source_address("127.0.0.1".parse().unwrap()).unwrap(), IpAddr::from([127, 0, 0, 1]));
    }
}
