//! Raw packet I/O for SYN scanning: choosing how probes leave ([`plan`]),
//! sending them in batches ([`Sender`]) and receiving only the replies
//! ([`Receiver`]). The syscalls themselves, the agent's only unsafe code,
//! are wrapped in [`sys`].
//!
//! Two send paths, chosen per address family by [`plan`]:
//! - **link**: Ethernet frames on an AF_PACKET socket that bypasses the
//!   qdisc (`PACKET_QDISC_BYPASS`), addressed to the gateway's MAC (the
//!   neighbour cache, or our own ARP request: [`arp`]). The fast path, for
//!   IPv4 targets that one gateway route on an Ethernet interface covers
//!   ([`route`]), taken only where the kernel's own route (rtnetlink
//!   `RTM_GETROUTE`) agrees for every range's first and last address.
//! - **ip**: whole IP packets on a raw IP socket; the kernel routes them and
//!   resolves neighbours. Used for IPv6, loopback, on-link targets,
//!   non-Ethernet links, and whenever the link path cannot be set up.
//!
//! Either way probes are written in place ([`packet`]) and go out up to
//! [`sys::MAX_BATCH`] per `sendmmsg`.
//!
//! Replies arrive in a `TPACKET_V3` receive ring: blocks of memory shared
//! with the kernel ([`DEFAULT_RING_BYTES`] unless the caller picks a size),
//! with no syscall, copy or wake-up per packet. A classic BPF program
//! ([`bpf`]), attached before the socket is bound, lets only TCP SYN-ACKs
//! and RSTs to our source port in. [`Receiver::recv`] polls the ring and
//! never sleeps in the kernel; the ring's drop counter
//! ([`Receiver::take_drops`]) is reported, never hidden.

pub mod arp;
pub mod bpf;
pub mod packet;
pub mod route;
pub mod sys;

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use packet::{LinkHeader, MAX_PROBE_LEN, ProbeTemplate, Reply};
use portfleet_core::AddressSet;
use sys::{Framing, MAX_BATCH, PacketSocket, RECV_SNAP, RawIpSocket, RxRing};

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "raw sockets need the CAP_NET_RAW capability: run as root, grant it with \
         `sudo setcap cap_net_raw,cap_net_admin+ep $(command -v portfleet-agent)`, \
         or use --scan-type connect"
    )]
    NoPrivilege,
    #[error("no route to {addr}: {reason}")]
    NoRoute { addr: IpAddr, reason: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> NetError {
    let context = context.into();
    move |source| {
        if source.kind() == io::ErrorKind::PermissionDenied {
            NetError::NoPrivilege
        } else {
            NetError::Io { context, source }
        }
    }
}

/// Whether this process may open raw sockets.
pub fn has_raw_privilege() -> bool {
    PacketSocket::open(Framing::Network, 0).is_ok()
}

/// Whether this host, in its network namespace, can send to global IPv6
/// unicast space (2000::/3) within `opts`: what the agent reports as its
/// IPv6 capability. Reads `/proc/net/ipv6_route` and `/proc/net/if_inet6`
/// ([`route::ipv6_reach`] decides); blocking, but only file reads.
pub fn ipv6_reach(opts: &NetOptions) -> route::Ipv6Reach {
    let read = |path: &str| {
        std::fs::read_to_string(path).map_err(|e| route::Ipv6Reach::Unknown {
            reason: if e.kind() == io::ErrorKind::NotFound {
                format!("no {path}: IPv6 is disabled in this kernel")
            } else {
                format!("cannot read {path}: {e}")
            },
        })
    };
    let tables = read("/proc/net/ipv6_route").and_then(|routes| Ok((routes, read("/proc/net/if_inet6")?)));
    match tables {
        Ok((routes, addrs)) => route::ipv6_reach(&route::parse_routes6(&routes), &route::parse_addrs6(&addrs), opts),
        Err(unknown) => unknown,
    }
}

/// Operator overrides for the send path.
#[derive(Clone, Debug, Default)]
pub struct NetOptions {
    /// Send (and receive) only on this interface.
    pub interface: Option<String>,
    /// Source address to put in probes instead of the kernel's choice.
    pub source_ip: Option<IpAddr>,
}

/// How probes of one address family leave the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Egress {
    Link { iface: String, ifindex: u32, header: LinkHeader },
    Ip { device: Option<String> },
}

/// The chosen send path for a scan's addresses.
#[derive(Clone, Debug)]
pub struct NetPlan {
    pub v4: Option<(Ipv4Addr, Egress)>,
    pub v6: Option<(Ipv6Addr, Egress)>,
    /// Interface the receiver listens on; 0 for all.
    pub recv_ifindex: u32,
    /// Target ranges whose route picks another source than their family's
    /// above (loopback beside a remote network, a second interface):
    /// `(first, last, source)`, sorted. A probe from the wrong source is
    /// dropped by the kernel or answered to nobody.
    pub other_sources: Vec<(IpAddr, IpAddr, IpAddr)>,
}

impl NetPlan {
    pub fn describe(&self) -> String {
        let one = |fam: &str, src: String, e: &Egress| match e {
            Egress::Link { iface, .. } => format!("{fam} from {src} via {iface} (link)"),
            Egress::Ip { device: Some(d) } => format!("{fam} from {src} via {d} (ip)"),
            Egress::Ip { device: None } => format!("{fam} from {src} (ip)"),
        };
        let mut parts = Vec::new();
        if let Some((src, e)) = &self.v4 {
            parts.push(one("ipv4", src.to_string(), e));
        }
        if let Some((src, e)) = &self.v6 {
            parts.push(one("ipv6", src.to_string(), e));
        }
        parts.join(", ")
    }
}

/// Chooses source addresses and send paths for `addrs`. Blocking: may ARP
/// for the gateway (up to about a second).
pub fn plan(addrs: &AddressSet, opts: &NetOptions) -> Result<NetPlan, NetError> {
    let first_v4 = addrs.ranges().iter().find(|r| !r.is_ipv6()).map(|r| r.first());
    let first_v6 = addrs.ranges().iter().find(|r| r.is_ipv6()).map(|r| r.first());
    let ip_egress = Egress::Ip { device: opts.interface.clone() };

    let v4 = match first_v4 {
        None => None,
        Some(dst) => {
            let IpAddr::V4(src) = source_for(dst, opts)? else { unreachable!("source of the target's family") };
            let egress = link_egress(addrs, src, opts).unwrap_or_else(|reason| {
                tracing::debug!(%reason, "ipv4 probes use the kernel's IP path");
                ip_egress.clone()
            });
            Some((src, egress))
        }
    };
    let v6 = match first_v6 {
        None => None,
        Some(dst) => {
            let IpAddr::V6(src) = source_for(dst, opts)? else { unreachable!("source of the target's family") };
            Some((src, ip_egress.clone()))
        }
    };
    let recv_ifindex = match (&v4, &v6, &opts.interface) {
        (Some((_, Egress::Link { ifindex, .. })), None, _) => *ifindex,
        (_, _, Some(name)) => sys::interface_index(name).map_err(io_err(format!("interface {name}")))?,
        _ => 0,
    };
    let other_sources = other_sources(addrs, v4.as_ref().map(|v| v.0), v6.as_ref().map(|v| v.0), opts);
    Ok(NetPlan { v4, v6, recv_ifindex, other_sources })
}

/// Ranges beyond this many keep their family's source unchecked: a route
/// lookup each would make planning slow, and such sets are one network.
const MAX_SOURCE_LOOKUPS: usize = 4096;

/// The ranges of `addrs` the kernel would send from another source than
/// `v4`/`v6` (see [`NetPlan::other_sources`]).
fn other_sources(
    addrs: &AddressSet,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
    opts: &NetOptions,
) -> Vec<(IpAddr, IpAddr, IpAddr)> {
    if opts.source_ip.is_some() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for range in addrs.ranges().iter().take(MAX_SOURCE_LOOKUPS) {
        let default = if range.is_ipv6() { v6.map(IpAddr::V6) } else { v4.map(IpAddr::V4) };
        match source_for(range.first(), opts) {
            Ok(src) if Some(src) != default => out.push((range.first(), range.last(), src)),
            Ok(_) => {}
            Err(e) => tracing::debug!(%range, error = %e, "no route: probes use the family's source"),
        }
    }
    out.sort_unstable();
    out
}

/// The source address for probes to `dst`'s family: the operator's, or
/// the kernel's choice. Always of `dst`'s family.
fn source_for(dst: IpAddr, opts: &NetOptions) -> Result<IpAddr, NetError> {
    if let Some(src) = opts.source_ip.filter(|s| s.is_ipv4() == dst.is_ipv4()) {
        return Ok(src);
    }
    match route::source_address(dst) {
        Ok(src) if src.is_ipv4() == dst.is_ipv4() => Ok(src),
        Ok(other) => Err(NetError::NoRoute { addr: dst, reason: format!("source {other}") }),
        Err(e) => Err(NetError::NoRoute { addr: dst, reason: e.to_string() }),
    }
}

/// The link path for every IPv4 range, if one gateway route on an Ethernet
/// interface covers them all; otherwise why not.
fn link_egress(addrs: &AddressSet, src: Ipv4Addr, opts: &NetOptions) -> Result<Egress, String> {
    let table = std::fs::read_to_string("/proc/net/route").map_err(|e| format!("/proc/net/route: {e}"))?;
    let routes = route::parse_routes(&table);
    let mut chosen: Option<&route::Route4> = None;
    for range in addrs.ranges().iter().filter(|r| !r.is_ipv6()) {
        let r = route::uniform_route(&routes, range).ok_or_else(|| format!("{range} spans several routes"))?;
        if chosen.is_some_and(|c| c != r) {
            return Err("targets use several routes".into());
        }
        chosen = Some(r);
    }
    let route = chosen.ok_or("no ipv4 targets")?;
    let gateway = route.gateway.ok_or_else(|| format!("targets are on-link on {}", route.iface))?;
    if opts.interface.as_ref().is_some_and(|i| *i != route.iface) {
        return Err(format!("route uses {}, not the requested interface", route.iface));
    }
    let (hwtype, src_mac) = sys::interface_hwaddr(&route.iface).map_err(|e| format!("{}: {e}", route.iface))?;
    if hwtype != sys::ARPHRD_ETHER {
        return Err(format!("{} is not Ethernet", route.iface));
    }
    let ifindex = sys::interface_index(&route.iface).map_err(|e| e.to_string())?;
    // The main table is not the whole story (local addresses, policy
    // rules): frames only go where the kernel itself would send them.
    for range in addrs.ranges().iter().filter(|r| !r.is_ipv6()) {
        for ip in [range.first(), range.last()] {
            if ip.is_loopback() {
                return Err(format!("{ip} is loopback"));
            }
            let k = sys::route_get(ip).map_err(|e| format!("kernel route to {ip}: {e}"))?;
            if k.kind != sys::RTN_UNICAST || k.oif != ifindex || k.gateway != Some(IpAddr::V4(gateway)) {
                return Err(format!("the kernel routes {ip} differently ({k:?})"));
            }
        }
    }
    let dst_mac = arp::resolve(&route.iface, ifindex, src_mac, src, gateway, Duration::from_millis(300))
        .map_err(|e| e.to_string())?;
    Ok(Egress::Link { iface: route.iface.clone(), ifindex, header: LinkHeader { src_mac, dst_mac } })
}

/// Probes waiting to go out one socket.
struct Queue {
    bufs: Box<[[u8; MAX_PROBE_LEN]; MAX_BATCH]>,
    lens: [usize; MAX_BATCH],
    dsts: [IpAddr; MAX_BATCH],
    n: usize,
}

impl Queue {
    fn new() -> Self {
        Self {
            bufs: Box::new([[0; MAX_PROBE_LEN]; MAX_BATCH]),
            lens: [0; MAX_BATCH],
            dsts: [IpAddr::V4(Ipv4Addr::UNSPECIFIED); MAX_BATCH],
            n: 0,
        }
    }
}

enum Out {
    Link(PacketSocket, LinkHeader),
    Ip(RawIpSocket),
}

/// One path's socket and its batch.
struct Lane {
    out: Out,
    queue: Queue,
}

impl Lane {
    fn open(egress: &Egress, v6: bool) -> Result<Self, NetError> {
        let out = match egress {
            Egress::Link { iface, ifindex, header } => {
                let s =
                    PacketSocket::open(Framing::Link, *ifindex).map_err(io_err(format!("packet socket on {iface}")))?;
                // Not every driver supports the bypass; it only saves time.
                let _ = s.set_qdisc_bypass();
                let _ = s.set_send_buffer(4 << 20);
                Out::Link(s, *header)
            }
            Egress::Ip { device } => {
                let s = RawIpSocket::open(v6).map_err(io_err("raw IP socket"))?;
                if let Some(d) = device {
                    s.bind_to_device(d).map_err(io_err(format!("bind to {d}")))?;
                }
                let _ = s.set_send_buffer(4 << 20);
                Out::Ip(s)
            }
        };
        Ok(Self { out, queue: Queue::new() })
    }

    fn link(&self) -> Option<&LinkHeader> {
        match &self.out {
            Out::Link(_, h) => Some(h),
            Out::Ip(_) => None,
        }
    }

    /// Sends everything queued; returns how many went out. Retries briefly
    /// when the device queue is full instead of dropping.
    fn flush(&mut self) -> io::Result<usize> {
        let q = &mut self.queue;
        let mut done = 0;
        let mut stalls = 0;
        while done < q.n {
            let res = match &self.out {
                Out::Link(s, _) => {
                    let frames: [&[u8]; MAX_BATCH] = std::array::from_fn(|i| &q.bufs[i][..q.lens[i]]);
                    s.send_batch(&frames[done..q.n])
                }
                Out::Ip(s) => {
                    let pkts: [(&[u8], IpAddr); MAX_BATCH] =
                        std::array::from_fn(|i| (&q.bufs[i][..q.lens[i]], q.dsts[i]));
                    s.send_batch(&pkts[done..q.n])
                }
            };
            match res {
                Ok(n) if n > 0 => {
                    done += n;
                    stalls = 0;
                }
                Ok(_) => stalls += 1,
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) => stalls += 1,
                Err(e) => {
                    q.n = 0;
                    return Err(e);
                }
            }
            if stalls > 0 {
                if stalls > 1000 {
                    break;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        q.n = 0;
        Ok(done)
    }
}

/// The sockets one send thread writes probes to.
pub struct Sender {
    template: ProbeTemplate,
    v4: Option<Lane>,
    v6: Option<Lane>,
}

impl Sender {
    pub fn open(plan: &NetPlan, src_port: u16) -> Result<Self, NetError> {
        let v4 = plan.v4.as_ref().map(|(_, e)| Lane::open(e, false)).transpose()?;
        let v6 = plan.v6.as_ref().map(|(_, e)| Lane::open(e, true)).transpose()?;
        Ok(Self {
            template: ProbeTemplate {
                src_v4: plan.v4.as_ref().map(|v| v.0),
                src_v6: plan.v6.as_ref().map(|v| v.0),
                other_sources: plan.other_sources.clone(),
                src_port,
            },
            v4,
            v6,
        })
    }

    pub fn source_for(&self, dst: IpAddr) -> Option<IpAddr> {
        self.template.source_for(dst)
    }

    /// Queues a SYN; flushes its lane when the batch is full. Returns how
    /// many probes went out.
    pub fn push(&mut self, dst: IpAddr, port: u16, seq: u32) -> io::Result<usize> {
        let lane = match dst {
            IpAddr::V4(_) => self.v4.as_mut(),
            IpAddr::V6(_) => self.v6.as_mut(),
        };
        let Some(lane) = lane else { return Ok(0) };
        let link = lane.link().copied();
        let i = lane.queue.n;
        let Some(len) = self.template.write_syn(&mut lane.queue.bufs[i], link.as_ref(), dst, port, seq) else {
            return Ok(0);
        };
        lane.queue.lens[i] = len;
        lane.queue.dsts[i] = dst;
        lane.queue.n += 1;
        if lane.queue.n == MAX_BATCH { lane.flush() } else { Ok(0) }
    }

    /// Sends everything queued.
    pub fn flush(&mut self) -> io::Result<usize> {
        let mut n = 0;
        for lane in [self.v4.as_mut(), self.v6.as_mut()].into_iter().flatten() {
            n += lane.flush()?;
        }
        Ok(n)
    }
}

/// The reply path: a TPACKET_V3 ring behind a kernel BPF filter.
pub struct Receiver {
    ring: RxRing,
}

/// Default ring: 16 blocks of 1 MiB - about 85,000 replies, a quarter
/// second at 300k/s, while keeping the agent's resident memory small.
pub const DEFAULT_RING_BYTES: usize = 16 << 20;
const MAX_RING_BLOCK: usize = 1 << 20;
const PAGE: usize = 4096;

impl Receiver {
    /// A ring of about `ring_bytes` (at least one page), in blocks of at
    /// most 1 MiB.
    pub fn open(ifindex: u32, dst_port: u16, ring_bytes: usize) -> Result<Self, NetError> {
        let filter = bpf::reply_filter(dst_port, RECV_SNAP as u32);
        let bytes = ring_bytes.max(PAGE).div_ceil(PAGE) * PAGE;
        let block = bytes.min(MAX_RING_BLOCK);
        let blocks = (bytes / block).max(1);
        let ring = RxRing::open(ifindex, &filter, block, blocks).map_err(io_err("receive ring"))?;
        Ok(Self { ring })
    }

    /// Bytes of the receive ring.
    pub fn buffer_bytes(&self) -> usize {
        self.ring.bytes()
    }

    /// Calls `f` for each TCP reply the kernel has handed over, without
    /// waiting. Returns the number of packets seen.
    ///
    /// Never blocking on the socket is deliberate: a reader asleep in the
    /// kernel must be woken for each delivery, and at 300k replies/s those
    /// wake-ups cost the send threads more than the packets themselves.
    /// Callers poll and sleep briefly when nothing came.
    pub fn recv(&mut self, mut f: impl FnMut(&Reply)) -> usize {
        self.ring.poll(|pkt| {
            if let Some(reply) = packet::parse_reply(pkt) {
                f(&reply);
            }
        })
    }

    /// Replies the kernel dropped because the ring was full, since the
    /// last call.
    pub fn take_drops(&self) -> u64 {
        self.ring.take_drops()
    }
}

#[cfg(test)]
mod tests {
    use portfleet_core::AddrRange;

    use super::*;

    /// Loopback probes must never be framed for an Ethernet gateway, even
    /// on a host whose main table sends 0.0.0.0/0 out of eth0.
    #[test]
    fn loopback_never_takes_the_link_path() {
        let addrs = AddressSet::new([AddrRange::from_net("127.0.0.0/30".parse().unwrap())]);
        let plan = plan(&addrs, &NetOptions::default()).unwrap();
        assert_eq!(plan.v4, Some((Ipv4Addr::LOCALHOST, Egress::Ip { device: None })));
    }

    #[test]
    fn the_kernel_says_loopback_is_local() {
        let r = sys::route_get("127.0.0.1".parse().unwrap()).unwrap();
        assert_eq!(r.kind, 2, "RTN_LOCAL");
    }
}
