//! The next hop's MAC address for Ethernet frames: from the kernel's
//! neighbour cache, or by asking with ARP ourselves. ARP only ever goes to
//! the gateway the kernel's own route names, never to scan targets.

use std::{
    io,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use super::{
    route,
    sys::{Framing, PacketSocket, RECV_SNAP},
};

const ETHERTYPE_ARP: u16 = 0x0806;

pub fn arp_request(src_mac: [u8; 6], src_ip: Ipv4Addr, target: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    // Ethernet, IPv4, hlen 6, plen 4, request.
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&src_mac);
    f[28..32].copy_from_slice(&src_ip.octets());
    f[38..42].copy_from_slice(&target.octets());
    f
}

/// The sender MAC of an ARP reply from `from`, if `frame` is one.
pub fn parse_arp_reply(frame: &[u8], from: Ipv4Addr) -> Option<[u8; 6]> {
    if frame.len() < 42 || frame[12..14] != ETHERTYPE_ARP.to_be_bytes() || frame[20..22] != [0, 2] {
        return None;
    }
    if frame[28..32] != from.octets() {
        return None;
    }
    frame[22..28].try_into().ok()
}

/// Looks `ip` up in the neighbour cache of `iface`, then asks by ARP (three
/// tries, `timeout` each).
pub fn resolve(
    iface: &str,
    ifindex: u32,
    src_mac: [u8; 6],
    src_ip: Ipv4Addr,
    ip: Ipv4Addr,
    timeout: Duration,
) -> io::Result<[u8; 6]> {
    if let Ok(table) = std::fs::read_to_string("/proc/net/arp")
        && let Some((_, mac)) = route::parse_arp(&table, iface).into_iter().find(|(a, _)| *a == ip)
    {
        return Ok(mac);
    }
    let sock = PacketSocket::open(Framing::Link, ifindex)?;
    sock.set_recv_timeout(Duration::from_millis(20))?;
    let request = arp_request(src_mac, src_ip, ip);
    let mut bufs = [[0u8; RECV_SNAP]; 8];
    let mut lens = [0usize; 8];
    for _ in 0..3 {
        sock.send_batch(&[&request])?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let n = sock.recv_batch(&mut bufs, &mut lens)?;
            for i in 0..n {
                if let Some(mac) = parse_arp_reply(&bufs[i][..lens[i]], ip) {
                    return Ok(mac);
                }
            }
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, format!("no ARP reply from next hop {ip} on {iface}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_request_and_reads_a_reply() {
        let mac = [2, 0, 0, 0, 0, 1];
        let req = arp_request(mac, Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        assert_eq!(&req[0..6], &[0xff; 6]);
        assert_eq!(&req[38..42], &[10, 0, 0, 2]);
        // Turn it into the reply the peer would send.
        let mut reply = req;
        reply[20..22].copy_from_slice(&[0, 2]);
        reply[22..28].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
        reply[28..32].copy_from_slice(&[10, 0, 0, 2]);
        assert_eq!(parse_arp_reply(&reply, Ipv4Addr::new(10, 0, 0, 2)), Some([2, 0, 0, 0, 0, 2]));
        assert_eq!(parse_arp_reply(&reply, Ipv4Addr::new(10, 0, 0, 3)), None);
        assert_eq!(parse_arp_reply(&req, Ipv4Addr::new(10, 0, 0, 1)), None);
    }
}
