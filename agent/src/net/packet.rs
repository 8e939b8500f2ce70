//! Building TCP SYN probes (IPv4 and IPv6, with or without an Ethernet
//! header) and parsing replies. No allocation: probes are written into
//! caller buffers, replies are read in place.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

const ETH_LEN: usize = 14;
const IPV4_LEN: usize = 20;
const IPV6_LEN: usize = 40;
/// TCP header with one option (MSS), as nmap and real stacks send.
const TCP_LEN: usize = 24;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// Longest probe: Ethernet + IPv6 + TCP.
pub const MAX_PROBE_LEN: usize = ETH_LEN + IPV6_LEN + TCP_LEN;

/// Ethernet addressing for frames written on an AF_PACKET socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkHeader {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
}

/// Everything about a probe that does not change from one to the next.
#[derive(Clone, Debug)]
pub struct ProbeTemplate {
    pub src_v4: Option<Ipv4Addr>,
    pub src_v6: Option<Ipv6Addr>,
    /// Ranges sent from another source, sorted (`NetPlan::other_sources`).
    pub other_sources: Vec<(IpAddr, IpAddr, IpAddr)>,
    pub src_port: u16,
}

impl ProbeTemplate {
    pub fn source_for(&self, dst: IpAddr) -> Option<IpAddr> {
        if !self.other_sources.is_empty() {
            let i = self.other_sources.partition_point(|(first, _, _)| *first <= dst);
            if let Some((_, last, src)) = i.checked_sub(1).map(|i| self.other_sources[i])
                && dst <= last
            {
                return Some(src);
            }
        }
        match dst {
            IpAddr::V4(_) => self.src_v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.src_v6.map(IpAddr::V6),
        }
    }

    /// Writes a SYN for `dst:dst_port` with sequence number `seq` into
    /// `buf`, behind an Ethernet header when `link` is given, and returns
    /// its length; `None` when there is no source address of the
    /// destination's family.
    pub fn write_syn(
        &self,
        buf: &mut [u8; MAX_PROBE_LEN],
        link: Option<&LinkHeader>,
        dst: IpAddr,
        dst_port: u16,
        seq: u32,
    ) -> Option<usize> {
        let mut off = 0;
        if let Some(link) = link {
            buf[0..6].copy_from_slice(&link.dst_mac);
            buf[6..12].copy_from_slice(&link.src_mac);
            let ethertype = if dst.is_ipv4() { ETHERTYPE_IPV4 } else { ETHERTYPE_IPV6 };
            buf[12..14].copy_from_slice(&ethertype.to_be_bytes());
            off = ETH_LEN;
        }
        match dst {
            IpAddr::V4(dst) => {
                let Some(IpAddr::V4(src)) = self.source_for(IpAddr::V4(dst)) else { return None };
                let ip = &mut buf[off..off + IPV4_LEN];
                ip[0] = 0x45;
                ip[1] = 0;
                ip[2..4].copy_from_slice(&((IPV4_LEN + TCP_LEN) as u16).to_be_bytes());
                // An id that varies, like a real stack's; nothing checks it.
                ip[4..6].copy_from_slice(&((seq >> 16) as u16 ^ dst_port).to_be_bytes());
                ip[6..8].copy_from_slice(&[0, 0]);
                ip[8] = 64;
                ip[9] = PROTO_TCP;
                ip[10..12].copy_from_slice(&[0, 0]);
                ip[12..16].copy_from_slice(&src.octets());
                ip[16..20].copy_from_slice(&dst.octets());
                let sum = checksum(ip, 0);
                ip[10..12].copy_from_slice(&sum.to_be_bytes());
                let tcp_off = off + IPV4_LEN;
                let pseudo = pseudo_v4(src, dst, TCP_LEN as u16);
                write_tcp_syn(&mut buf[tcp_off..tcp_off + TCP_LEN], self.src_port, dst_port, seq, pseudo);
                Some(tcp_off + TCP_LEN)
            }
            IpAddr::V6(dst) => {
                let Some(IpAddr::V6(src)) = self.source_for(IpAddr::V6(dst)) else { return None };
                let ip = &mut buf[off..off + IPV6_LEN];
                ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
                ip[4..6].copy_from_slice(&(TCP_LEN as u16).to_be_bytes());
                ip[6] = PROTO_TCP;
                ip[7] = 64;
                ip[8..24].copy_from_slice(&src.octets());
                ip[24..40].copy_from_slice(&dst.octets());
                let tcp_off = off + IPV6_LEN;
                let pseudo = pseudo_v6(src, dst, TCP_LEN as u32);
                write_tcp_syn(&mut buf[tcp_off..tcp_off + TCP_LEN], self.src_port, dst_port, seq, pseudo);
                Some(tcp_off + TCP_LEN)
            }
        }
    }
}

fn write_tcp_syn(tcp: &mut [u8], src_port: u16, dst_port: u16, seq: u32, pseudo: u32) {
    tcp[0..2].copy_from_slice(&src_port.to_be_bytes());
    tcp[2..4].copy_from_slice(&dst_port.to_be_bytes());
    tcp[4..8].copy_from_slice(&seq.to_be_bytes());
    tcp[8..12].copy_from_slice(&[0; 4]);
    tcp[12] = ((TCP_LEN / 4) as u8) << 4;
    tcp[13] = TCP_SYN;
    tcp[14..16].copy_from_slice(&1024u16.to_be_bytes());
    tcp[16..18].copy_from_slice(&[0, 0]);
    tcp[18..20].copy_from_slice(&[0, 0]);
    // MSS 1460.
    tcp[20..24].copy_from_slice(&[2, 4, 0x05, 0xb4]);
    let sum = checksum(tcp, pseudo);
    tcp[16..18].copy_from_slice(&sum.to_be_bytes());
}

fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, len: u16) -> u32 {
    let mut sum = sum_words(&src.octets()) + sum_words(&dst.octets());
    sum += u32::from(PROTO_TCP) + u32::from(len);
    sum
}

fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, len: u32) -> u32 {
    let mut sum = sum_words(&src.octets()) + sum_words(&dst.octets());
    sum += (len >> 16) + (len & 0xffff) + u32::from(PROTO_TCP);
    sum
}

fn sum_words(data: &[u8]) -> u32 {
    let mut sum = 0u32;
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// The Internet checksum (RFC 1071) of `data` plus a partial sum.
pub fn checksum(data: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial) + u64::from(sum_words(data));
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The fields of a TCP reply that matter to a scanner.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reply {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub seq: u32,
    pub ack: u32,
    pub flags: u8,
}

impl Reply {
    pub fn is_syn_ack(&self) -> bool {
        self.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK && self.flags & TCP_RST == 0
    }

    pub fn is_rst(&self) -> bool {
        self.flags & TCP_RST != 0
    }
}

/// Parses an IP packet (from the network header on) carrying TCP. Returns
/// `None` for anything else, fragments, IPv6 extension headers, or a
/// packet too short to hold the TCP fields read.
pub fn parse_reply(pkt: &[u8]) -> Option<Reply> {
    let version = pkt.first()? >> 4;
    let (src, dst, tcp) = match version {
        4 => {
            let ihl = usize::from(pkt[0] & 0x0f) * 4;
            if ihl < IPV4_LEN || pkt.len() < ihl || pkt[9] != PROTO_TCP {
                return None;
            }
            // More fragments, or not the first fragment.
            if u16::from_be_bytes([pkt[6], pkt[7]]) & 0x3fff != 0 {
                return None;
            }
            let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
            let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
            (IpAddr::V4(src), IpAddr::V4(dst), &pkt[ihl..])
        }
        6 => {
            if pkt.len() < IPV6_LEN || pkt[6] != PROTO_TCP {
                return None;
            }
            let src: [u8; 16] = pkt[8..24].try_into().ok()?;
            let dst: [u8; 16] = pkt[24..40].try_into().ok()?;
            (IpAddr::V6(src.into()), IpAddr::V6(dst.into()), &pkt[IPV6_LEN..])
        }
        _ => return None,
    };
    if tcp.len() < 14 {
        return None;
    }
    Some(Reply {
        src,
        dst,
        src_port: u16::from_be_bytes([tcp[0], tcp[1]]),
        dst_port: u16::from_be_bytes([tcp[2], tcp[3]]),
        seq: u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]),
        ack: u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]),
        flags: tcp[13],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINK: LinkHeader = LinkHeader { src_mac: [0x02, 0, 0, 0, 0, 0x01], dst_mac: [0x02, 0, 0, 0, 0, 0x02] };

    fn template() -> ProbeTemplate {
        ProbeTemplate {
            src_v4: Some(Ipv4Addr::new(10, 0, 0, 1)),
            src_v6: Some("2001:db8::1".parse().unwrap()),
            other_sources: Vec::new(),
            src_port: 40000,
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// Golden bytes computed independently (a separate Python
    /// implementation of RFC 791/793/1071): IPv4 header checksum 0x6578,
    /// TCP checksum 0xdf8d.
    #[test]
    fn ipv4_syn_matches_golden_bytes() {
        let mut buf = [0u8; MAX_PROBE_LEN];
        let n = template().write_syn(&mut buf, Some(&LINK), "10.0.0.2".parse().unwrap(), 80, 0x0102_0304).unwrap();
        let expected = hex("020000000002 020000000001 0800
             4500 002c 0152 0000 4006 6578 0a000001 0a000002
             9c40 0050 01020304 00000000 6002 0400 df8d 0000 020405b4");
        assert_eq!(&buf[..n], &expected[..], "got {:02x?}", &buf[..n]);
        // Both checksums verify to zero over the finished bytes.
        assert_eq!(checksum(&buf[14..34], 0), 0);
        let pseudo = pseudo_v4(Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2), 24);
        assert_eq!(checksum(&buf[34..58], pseudo), 0);
    }

    /// TCP checksum 0xfd18 over the IPv6 pseudo-header, computed the same way.
    #[test]
    fn ipv6_syn_matches_golden_bytes() {
        let mut buf = [0u8; MAX_PROBE_LEN];
        let n = template().write_syn(&mut buf, None, "2001:db8::2".parse().unwrap(), 443, 0xdead_beef).unwrap();
        let expected = hex("6000 0000 0018 0640
             20010db8000000000000000000000001
             20010db8000000000000000000000002
             9c40 01bb deadbeef 00000000 6002 0400 fd18 0000 020405b4");
        assert_eq!(&buf[..n], &expected[..], "got {:02x?}", &buf[..n]);
        let pseudo = pseudo_v6("2001:db8::1".parse().unwrap(), "2001:db8::2".parse().unwrap(), 24);
        assert_eq!(checksum(&buf[40..64], pseudo), 0);
    }

    #[test]
    fn ranges_routed_from_another_source_are_probed_from_it() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let mut t = template();
        t.other_sources = vec![(ip("127.0.0.1"), ip("127.0.0.1"), ip("127.0.0.1"))];
        assert_eq!(t.source_for(ip("127.0.0.1")), Some(ip("127.0.0.1")));
        for other in ["10.0.0.2", "126.255.255.255", "127.0.0.2"] {
            assert_eq!(t.source_for(ip(other)), Some(ip("10.0.0.1")), "{other}");
        }
        let mut buf = [0u8; MAX_PROBE_LEN];
        let n = t.write_syn(&mut buf, None, ip("127.0.0.1"), 80, 1).unwrap();
        assert_eq!(&buf[12..20], &[127, 0, 0, 1, 127, 0, 0, 1]);
        assert_eq!(checksum(&buf[..20], 0), 0);
        assert!(n > 20);
    }

    #[test]
    fn no_source_of_the_family_means_no_probe() {
        let mut t = template();
        t.src_v6 = None;
        let mut buf = [0u8; MAX_PROBE_LEN];
        assert_eq!(t.write_syn(&mut buf, None, "2001:db8::2".parse().unwrap(), 1, 1), None);
    }

    #[test]
    fn parses_what_it_builds_and_rejects_junk() {
        let mut buf = [0u8; MAX_PROBE_LEN];
        let t = template();
        let n = t.write_syn(&mut buf, None, "10.0.0.2".parse().unwrap(), 22, 7).unwrap();
        let r = parse_reply(&buf[..n]).unwrap();
        assert_eq!(
            (r.src, r.dst, r.src_port, r.dst_port, r.seq, r.flags),
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap(), 40000, 22, 7, TCP_SYN)
        );
        let n6 = t.write_syn(&mut buf, None, "2001:db8::9".parse().unwrap(), 22, 9).unwrap();
        assert_eq!(parse_reply(&buf[..n6]).unwrap().dst_port, 22);
        for junk in [&[][..], &[0x45][..], &[0x45; 20][..], &buf[..30], &[0x60; 41][..]] {
            assert_eq!(parse_reply(junk), None);
        }
        // A fragment is refused.
        let n = t.write_syn(&mut buf, None, "10.0.0.2".parse().unwrap(), 22, 7).unwrap();
        buf[6] = 0x20;
        assert_eq!(parse_reply(&buf[..n]), None);
    }
}
