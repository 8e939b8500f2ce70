//! Test networks: a scanner namespace and a target namespace joined by a
//! veth pair. The target side answers for a whole IPv4 /24 and an IPv6
//! /120 (`route local ... dev lo`), so listeners can be bound to any
//! address in them; a second block is routed to the target but not local
//! there, so its hosts are silent (filtered). Neither namespace has a
//! default route: nothing the scanner sends can leave the pair.
//!
//! Everything is removed on drop, also when the test panics.

#![allow(unsafe_code)]

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;

/// Target addresses: live IPv4 block, silent IPv4 block, live IPv6 block.
pub const LIVE_V4: &str = "198.18.1.0/24";
pub const DEAD_V4: &str = "198.18.2.0/28";
pub const LIVE_V6: &str = "2001:db8:77:1::/120";
pub const DEAD_V6: &str = "2001:db8:77:2::/124";

static COUNTER: AtomicU32 = AtomicU32::new(0);

pub struct NetTopology {
    pub scanner: String,
    pub target: String,
    pub scanner_if: String,
    pub target_if: String,
    /// Root-namespace end of the management link, when there is one.
    mgmt_if: Option<String>,
    /// The controller side of the management link (in the root namespace),
    /// which agents in the scanner namespace can reach.
    pub controller_ip: Option<Ipv4Addr>,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl NetTopology {
    /// Builds the topology, or explains why it cannot. Under `CI=true` a
    /// failure panics: end-to-end tests must not skip there.
    pub fn create() -> Option<Self> {
        Self::checked(Self::try_create())
    }

    /// The topology plus a /30 link from the root namespace to the scanner
    /// namespace, for agents there to reach a controller here. Scan
    /// targets stay in the target namespace.
    pub fn create_with_controller_link() -> Option<Self> {
        Self::checked(Self::try_create().and_then(|mut t| {
            t.add_mgmt()?;
            Ok(t)
        }))
    }

    fn checked<T>(made: Result<T, String>) -> Option<T> {
        match made {
            Ok(t) => Some(t),
            Err(e) if std::env::var("CI").as_deref() == Ok("true") => {
                panic!("CI=true and the test network cannot be built (needs root and iproute2): {e}")
            }
            Err(e) => {
                eprintln!("skipping: cannot build the test network (needs root and iproute2): {e}");
                None
            }
        }
    }

    fn add_mgmt(&mut self) -> Result<(), String> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        // A /30 in 10.75.0.0/16 per topology; distinct for concurrent tests.
        let idx = (std::process::id().wrapping_mul(31).wrapping_add(n * 7919)) % 16_000;
        let base = u32::from(Ipv4Addr::new(10, 75, 0, 0)) + idx * 4;
        let (root_ip, ns_ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let root_if = format!("pfm{}", &self.scanner_if[3..]);
        let ns_if = format!("pfn{}", &self.scanner_if[3..]);
        ip(&["link", "add", &root_if, "type", "veth", "peer", "name", &ns_if, "netns", &self.scanner])?;
        self.mgmt_if = Some(root_if.clone());
        ip(&["addr", "add", &format!("{root_ip}/30"), "dev", &root_if])?;
        ip(&["link", "set", &root_if, "up"])?;
        ip(&["-n", &self.scanner, "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        ip(&["-n", &self.scanner, "link", "set", &ns_if, "up"])?;
        self.controller_ip = Some(root_ip);
        Ok(())
    }

    fn try_create() -> Result<Self, String> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id() % 100_000);
        let t = Self {
            scanner: format!("pft-{id}-s"),
            target: format!("pft-{id}-t"),
            scanner_if: format!("pfs{id}"),
            target_if: format!("pft{id}"),
            mgmt_if: None,
            controller_ip: None,
        };
        // From here on, Drop cleans up whatever was made.
        let (s, tg, si, ti) = (&t.scanner, &t.target, &t.scanner_if, &t.target_if);
        ip(&["netns", "add", s])?;
        ip(&["netns", "add", tg])?;
        // No duplicate address detection: addresses usable at once.
        for ns in [s, tg] {
            for knob in ["net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0"] {
                ip(&["netns", "exec", ns, "sysctl", "-qw", knob])?;
            }
        }
        ip(&["link", "add", si, "netns", s, "type", "veth", "peer", "name", ti, "netns", tg])?;
        for (ns, dev, v4, v6) in
            [(s, si, "198.19.0.1/30", "2001:db8:76::1/64"), (tg, ti, "198.19.0.2/30", "2001:db8:76::2/64")]
        {
            ip(&["-n", ns, "addr", "add", v4, "dev", dev])?;
            ip(&["-n", ns, "addr", "add", v6, "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        ip(&["-n", tg, "route", "add", "local", LIVE_V4, "dev", "lo"])?;
        ip(&["-n", tg, "-6", "route", "add", "local", LIVE_V6, "dev", "lo"])?;
        // IPv6 listeners may bind addresses that are local only by route.
        ip(&["netns", "exec", tg, "sysctl", "-qw", "net.ipv6.ip_nonlocal_bind=1"])?;
        for block in [LIVE_V4, DEAD_V4] {
            ip(&["-n", s, "route", "add", block, "via", "198.19.0.2", "dev", si])?;
        }
        for block in [LIVE_V6, DEAD_V6] {
            ip(&["-n", s, "-6", "route", "add", block, "via", "2001:db8:76::2", "dev", si])?;
        }
        // Static neighbours: IPv6 neighbour discovery on a link that just came
        // up takes a second, and the kernel drops what it queued meanwhile.
        let mac = |ns: &str, dev: &str| -> Result<String, String> {
            let out =
                Command::new("ip").args(["-n", ns, "-br", "link", "show", dev]).output().map_err(|e| e.to_string())?;
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            text.split_whitespace().nth(2).map(str::to_string).ok_or_else(|| format!("no MAC for {dev}: {text}"))
        };
        let (smac, tmac) = (mac(s, si)?, mac(tg, ti)?);
        for (ns, dev, peer4, peer6, lladdr) in
            [(s, si, "198.19.0.2", "2001:db8:76::2", &tmac), (tg, ti, "198.19.0.1", "2001:db8:76::1", &smac)]
        {
            ip(&["-n", ns, "neigh", "replace", peer4, "lladdr", lladdr, "dev", dev, "nud", "permanent"])?;
            ip(&["-n", ns, "-6", "neigh", "replace", peer6, "lladdr", lladdr, "dev", dev, "nud", "permanent"])?;
        }
        // As the benchmarks do: segmentation offload off on the scanner side.
        let _ = Command::new("ip").args(["netns", "exec", s, "ethtool", "-K", si, "tso", "off", "gso", "off"]).output();
        Ok(t)
    }

    /// Makes `block` (an IPv4 CIDR) live in the target namespace too, routed
    /// from the scanner like the others: for tests that need addresses of
    /// a particular range (a CDN's). Still no default route: probes to it
    /// reach the target namespace and nothing else.
    pub fn add_live_v4_block(&self, block: &str) {
        ip(&["-n", &self.target, "route", "add", "local", block, "dev", "lo"]).expect("local route");
        ip(&["-n", &self.scanner, "route", "add", block, "via", "198.19.0.2", "dev", &self.scanner_if])
            .expect("scanner route");
    }

    /// A command run inside the scanner namespace.
    pub fn in_scanner(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.scanner]).arg(program);
        cmd
    }

    /// Target-side count of RSTs sent: one per SYN that hit a closed port,
    /// so it moves exactly when probes arrive.
    pub fn target_out_rsts(&self) -> u64 {
        let out = Command::new("ip").args(["netns", "exec", &self.target, "cat", "/proc/net/snmp"]).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
        let mut tcp = text.lines().filter(|l| l.starts_with("Tcp:"));
        let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else { return 0 };
        let i = names.split_whitespace().position(|n| n == "OutRsts").unwrap_or(0);
        values.split_whitespace().nth(i).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// Packets the target side has received so far.
    pub fn target_rx_packets(&self) -> u64 {
        let stat = format!("/sys/class/net/{}/statistics/rx_packets", self.target_if);
        let out =
            Command::new("ip").args(["netns", "exec", &self.target, "cat", &stat]).output().expect("read rx_packets");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("rx_packets is a number")
    }

    /// Starts sampling the target's received packets every `every`.
    pub fn sample_target_rx(&self, every: Duration) -> RxSampler {
        let ns = format!("/run/netns/{}", self.target);
        let interface = self.target_if.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let handle = std::thread::spawn(move || {
            let file = std::fs::File::open(&ns).expect("open namespace");
            // SAFETY: setns on this thread only; the fd is valid.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            let read = || {
                let text = std::fs::read_to_string("/proc/thread-self/net/dev").expect("read net/dev");
                let n = rx_packets(&text, &interface).unwrap_or_else(|| panic!("no {interface} in {text}"));
                (Instant::now(), n)
            };
            let mut samples = Vec::new();
            while !done.load(Ordering::Relaxed) {
                samples.push(read());
                std::thread::sleep(every);
            }
            samples.push(read());
            samples
        });
        RxSampler { stop, handle }
    }

    /// Opens TCP listeners inside `namespace` (the target's unless given)
    /// and accepts (then closes) whatever connects, so connect scans never
    /// fill a backlog. Returns the open set.
    pub fn listen(&self, addrs: &[SocketAddr]) -> Listeners {
        self.listen_in(&self.target, addrs)
    }

    pub fn listen_in(&self, namespace: &str, addrs: &[SocketAddr]) -> Listeners {
        let tasks = bind_in(namespace, addrs)
            .into_iter()
            .map(|l| {
                tokio::spawn(async move {
                    let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
                    while let Ok((s, _)) = l.accept().await {
                        drop(s);
                    }
                })
            })
            .collect();
        Listeners { tasks }
    }

    /// A server in the target namespace: each connection to `addr` is
    /// handed to `handler` in a task of its own.
    pub fn serve<F, Fut>(&self, addr: SocketAddr, handler: F) -> Listeners
    where
        F: Fn(tokio::net::TcpStream) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let tasks = bind_in(&self.target, &[addr])
            .into_iter()
            .map(|l| {
                let handler = handler.clone();
                tokio::spawn(async move {
                    let l = tokio::net::TcpListener::from_std(l).expect("tokio listener");
                    while let Ok((s, _)) = l.accept().await {
                        tokio::spawn(handler(s));
                    }
                })
            })
            .collect();
        Listeners { tasks }
    }
}

/// A namespace with loopback and an IPv4 /30 link to the root namespace,
/// nothing more: its only IPv6 addresses are `::1` and link-local, and it
/// has no IPv6 route beyond them. For agents whose own view of the network
/// is under test; there is nothing to scan from it.
pub struct Ipv4OnlyNamespace {
    pub name: String,
    /// Root-namespace end of the link, once made.
    root_if: Option<String>,
    /// The root-namespace side of the link, where a controller can listen.
    pub controller_ip: Ipv4Addr,
}

impl Ipv4OnlyNamespace {
    /// Builds it, or explains why it cannot; panics under `CI=true` as
    /// [`NetTopology::create`] does.
    pub fn create() -> Option<Self> {
        NetTopology::checked(Self::try_create())
    }

    fn try_create() -> Result<Self, String> {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}{n}", std::process::id() % 100_000);
        // A /30 in 10.76.0.0/16 (NetTopology's links use 10.75.0.0/16).
        let idx = (std::process::id().wrapping_mul(31).wrapping_add(n * 7919)) % 16_000;
        let base = u32::from(Ipv4Addr::new(10, 76, 0, 0)) + idx * 4;
        let (root_ip, ns_ip) = (Ipv4Addr::from(base + 1), Ipv4Addr::from(base + 2));
        let mut ns = Self { name: format!("pfv-{id}"), root_if: None, controller_ip: root_ip };
        let (root_if, ns_if) = (format!("pfvr{id}"), format!("pfvn{id}"));
        // From here on, Drop cleans up whatever was made.
        ip(&["netns", "add", &ns.name])?;
        ip(&["link", "add", &root_if, "type", "veth", "peer", "name", &ns_if, "netns", &ns.name])?;
        ns.root_if = Some(root_if.clone());
        ip(&["addr", "add", &format!("{root_ip}/30"), "dev", &root_if])?;
        ip(&["link", "set", &root_if, "up"])?;
        ip(&["-n", &ns.name, "addr", "add", &format!("{ns_ip}/30"), "dev", &ns_if])?;
        ip(&["-n", &ns.name, "link", "set", &ns_if, "up"])?;
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).arg(program);
        cmd
    }
}

impl Drop for Ipv4OnlyNamespace {
    fn drop(&mut self) {
        if let Some(r) = &self.root_if {
            let _ = ip(&["link", "del", r]);
        }
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Listening sockets bound inside `namespace`.
fn bind_in(namespace: &str, addrs: &[SocketAddr]) -> Vec<std::net::TcpListener> {
    let ns = format!("/run/netns/{namespace}");
    let addrs = addrs.to_vec();
    // Sockets belong to the namespace of the thread that creates them.
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns).expect("open namespace");
        // SAFETY: setns on this short-lived thread only; the fd is valid.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        addrs
            .iter()
            .map(|a| {
                let l = std::net::TcpListener::bind(a).unwrap_or_else(|e| panic!("listen on {a}: {e}"));
                l.set_nonblocking(true).expect("nonblocking");
                l
            })
            .collect::<Vec<_>>()
    })
    .join()
    .expect("listener thread")
}

impl Drop for NetTopology {
    fn drop(&mut self) {
        // Deleting a namespace removes its veth end, and so the pair.
        if let Some(m) = &self.mgmt_if {
            let _ = ip(&["link", "del", m]);
        }
        let _ = ip(&["netns", "del", &self.scanner]);
        let _ = ip(&["netns", "del", &self.target]);
    }
}

/// Samples the target interface's received-packet count until finished,
/// from a thread inside the target namespace: reading
/// `/proc/thread-self/net/dev` takes microseconds, so each sample's time is
/// the time of its count (a process per sample would blur both).
pub struct RxSampler {
    stop: Arc<AtomicBool>,
    handle: std::thread::JoinHandle<Vec<(Instant, u64)>>,
}

impl RxSampler {
    /// Stops sampling (one last sample first) and returns the samples.
    pub fn finish(self) -> Vec<(Instant, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().expect("sampler thread")
    }
}

fn rx_packets(net_dev: &str, interface: &str) -> Option<u64> {
    let line = net_dev.lines().find_map(|l| l.trim_start().strip_prefix(interface)?.strip_prefix(':'))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub struct Listeners {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Listeners {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// `count` distinct random (address, port) pairs in the live blocks, and
/// the ports they use.
pub fn random_open_set(count: usize, v6: bool, ports: &[u16]) -> BTreeSet<SocketAddr> {
    let mut set = BTreeSet::new();
    while set.len() < count {
        let host: u8 = rand::random_range(1..=254);
        let ip = if v6 {
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x77, 1, 0, 0, 0, u16::from(host)))
        } else {
            IpAddr::V4(Ipv4Addr::new(198, 18, 1, host))
        };
        let port = ports[rand::random_range(0..ports.len())];
        set.insert(SocketAddr::new(ip, port));
    }
    set
}
