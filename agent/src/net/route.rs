//! Which way probes leave: the kernel's IPv4 routes (`/proc/net/route`),
//! its neighbour cache (`/proc/net/arp`), and the source address it would
//! pick. Parsing is pure and tested on captured tables.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, UdpSocket},
};

use portfleet_core::AddrRange;

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

    #[test]
    fn loopback_source_is_loopback() {
        assert_eq!(source_address("127.0.0.1".parse().unwrap()).unwrap(), IpAddr::from([127, 0, 0, 1]));
    }
}
