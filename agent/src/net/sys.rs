//! The agent's only unsafe code: thin wrappers over the socket syscalls
//! the raw-packet path needs (AF_PACKET and raw IP sockets, `sendmmsg`,
//! `recvmmsg`, classic BPF, packet statistics). Each wrapper checks its
//! inputs so callers stay in safe Rust.

#![allow(unsafe_code)]

use std::{
    ffi::CString,
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

// Values from <linux/if_packet.h> and <asm/socket.h>; stable kernel ABI.
const PACKET_STATISTICS: libc::c_int = 6;
const PACKET_QDISC_BYPASS: libc::c_int = 20;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;
const SO_SNDBUFFORCE: libc::c_int = 32;

/// Most packets moved per `sendmmsg`/`recvmmsg` call.
pub const MAX_BATCH: usize = 64;

/// A classic BPF instruction, as `struct sock_filter`.
pub type BpfInsn = libc::sock_filter;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn socket(domain: libc::c_int, ty: libc::c_int, protocol: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; on success the kernel returns a new descriptor
    // that nothing else owns.
    let fd = cvt(unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, protocol) })?;
    // SAFETY: `fd` is a freshly created, valid descriptor owned only here.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn setsockopt<T>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live `T` of the size passed.
    cvt(unsafe {
        libc::setsockopt(fd.as_raw_fd(), level, name, (value as *const T).cast(), size_of::<T>() as libc::socklen_t)
    })?;
    Ok(())
}

fn getsockopt<T: Copy>(fd: &OwnedFd, level: libc::c_int, name: libc::c_int, init: T) -> io::Result<T> {
    let mut value = init;
    let mut len = size_of::<T>() as libc::socklen_t;
    // SAFETY: `value` is a live, writable `T` and `len` is its size.
    cvt(unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&mut value as *mut T).cast(), &mut len) })?;
    Ok(value)
}

/// The index of a network interface by name.
pub fn interface_index(name: &str) -> io::Result<u32> {
    let c = CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has NUL"))?;
    // SAFETY: `c` is a valid NUL-terminated string for the call's duration.
    let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if index == 0 {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("no interface named {name:?}")));
    }
    Ok(index)
}

fn set_timeout(fd: &OwnedFd, name: libc::c_int, timeout: Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: timeout.subsec_micros() as libc::suseconds_t,
    };
    setsockopt(fd, libc::SOL_SOCKET, name, &tv)
}

/// Sets a socket buffer, beyond `rmem_max`/`wmem_max` when the process has
/// CAP_NET_ADMIN. Returns the size the kernel granted.
fn set_buffer(fd: &OwnedFd, force: libc::c_int, plain: libc::c_int, bytes: usize) -> io::Result<usize> {
    let want = bytes.min(i32::MAX as usize / 2) as libc::c_int;
    if setsockopt(fd, libc::SOL_SOCKET, force, &want).is_err() {
        setsockopt(fd, libc::SOL_SOCKET, plain, &want)?;
    }
    let got: libc::c_int = getsockopt(fd, libc::SOL_SOCKET, plain, 0)?;
    Ok(got.max(0) as usize)
}

/// Binds an AF_PACKET socket to every protocol on `ifindex` (0: all).
fn bind_packet(fd: &OwnedFd, ifindex: u32) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sll: libc::sockaddr_ll = unsafe { zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: `sll` is a valid sockaddr_ll and the length matches it.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    })?;
    Ok(())
}

/// How an AF_PACKET socket frames what it reads and writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// With the link-layer header (we write Ethernet frames).
    Link,
    /// From the network header on (we read IP packets on any link type).
    Network,
}

/// An AF_PACKET socket bound to one interface (or all, index 0).
#[derive(Debug)]
pub struct PacketSocket {
    fd: OwnedFd,
}

impl PacketSocket {
    /// Needs CAP_NET_RAW; fails with `PermissionDenied` without it.
    pub fn open(framing: Framing, ifindex: u32) -> io::Result<Self> {
        let ty = match framing {
            Framing::Link => libc::SOCK_RAW,
            Framing::Network => libc::SOCK_DGRAM,
        };
        let proto = (libc::ETH_P_ALL as u16).to_be() as libc::c_int;
        let fd = socket(libc::AF_PACKET, ty, proto)?;
        bind_packet(&fd, ifindex)?;
        Ok(Self { fd })
    }

    /// Hands frames straight to the driver, skipping the qdisc layer.
    pub fn set_qdisc_bypass(&self) -> io::Result<()> {
        setsockopt(&self.fd, libc::SOL_PACKET, PACKET_QDISC_BYPASS, &1 as &libc::c_int)
    }

    pub fn set_send_buffer(&self, bytes: usize) -> io::Result<usize> {
        set_buffer(&self.fd, SO_SNDBUFFORCE, libc::SO_SNDBUF, bytes)
    }

    pub fn set_recv_timeout(&self, timeout: Duration) -> io::Result<()> {
        set_timeout(&self.fd, libc::SO_RCVTIMEO, timeout)
    }

    /// Sends whole frames (the socket is bound, so no address is needed).
    /// Returns how many the kernel took.
    pub fn send_batch(&self, frames: &[&[u8]]) -> io::Result<usize> {
        let n = frames.len().min(MAX_BATCH);
        // SAFETY: iovec and mmsghdr are plain data; zero is valid for both.
        let mut iov: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
        for i in 0..n {
            iov[i] = libc::iovec { iov_base: frames[i].as_ptr().cast_mut().cast(), iov_len: frames[i].len() };
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        send_mmsg(&self.fd, &mut msgs[..n])
    }

    /// Reads up to `bufs.len()` packets, waiting at most the receive
    /// timeout for the first. Each packet is truncated to its buffer; `lens`
    /// gets the bytes stored. Returns 0 on timeout.
    pub fn recv_batch(&self, bufs: &mut [[u8; RECV_SNAP]], lens: &mut [usize]) -> io::Result<usize> {
        let n = bufs.len().min(lens.len()).min(MAX_BATCH);
        // SAFETY: plain data; zero is valid.
        let mut iov: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
        // SAFETY: plain data; zero is valid.
        let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
        for i in 0..n {
            iov[i] = libc::iovec { iov_base: bufs[i].as_mut_ptr().cast(), iov_len: RECV_SNAP };
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: `msgs[..n]` point at `n` live, writable buffers of
        // RECV_SNAP bytes each; the kernel writes at most that much.
        let got = unsafe {
            libc::recvmmsg(
                self.fd.as_raw_fd(),
                msgs.as_mut_ptr(),
                n as libc::c_uint,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if got < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let got = got as usize;
        for i in 0..got {
            lens[i] = (msgs[i].msg_len as usize).min(RECV_SNAP);
        }
        Ok(got)
    }
}

/// Bytes kept of each received packet: enough for IPv6 + TCP headers.
pub const RECV_SNAP: usize = 128;

/// A raw IP socket that takes whole IP packets (IP_HDRINCL) and lets the
/// kernel route them and resolve neighbours: the sender for loopback,
/// non-Ethernet links, on-link targets and IPv6.
#[derive(Debug)]
pub struct RawIpSocket {
    fd: OwnedFd,
    v6: bool,
}

impl RawIpSocket {
    pub fn open(v6: bool) -> io::Result<Self> {
        let fd = if v6 {
            let fd = socket(libc::AF_INET6, libc::SOCK_RAW, libc::IPPROTO_RAW)?;
            setsockopt(&fd, libc::IPPROTO_IPV6, libc::IPV6_HDRINCL, &1 as &libc::c_int)?;
            fd
        } else {
            // IPPROTO_RAW implies IP_HDRINCL.
            socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW)?
        };
        Ok(Self { fd, v6 })
    }

    pub fn set_send_buffer(&self, bytes: usize) -> io::Result<usize> {
        set_buffer(&self.fd, SO_SNDBUFFORCE, libc::SO_SNDBUF, bytes)
    }

    /// Sends IP packets to their destinations. Returns how many the kernel
    /// took; packets of the wrong family are refused.
    pub fn send_batch(&self, packets: &[(&[u8], IpAddr)]) -> io::Result<usize> {
        let n = packets.len().min(MAX_BATCH);
        // SAFETY: plain data; zero is valid.
        let mut iov: [libc::iovec; MAX_BATCH] = unsafe { zeroed() };
        // SAFETY: plain data; zero is valid.
        let mut msgs: [libc::mmsghdr; MAX_BATCH] = unsafe { zeroed() };
        // SAFETY: plain data; zero is valid.
        let mut addrs: [libc::sockaddr_in6; MAX_BATCH] = unsafe { zeroed() };
        for i in 0..n {
            let (bytes, dst) = packets[i];
            let len = match (dst, self.v6) {
                (IpAddr::V4(v4), false) => {
                    let sa = sockaddr_v4(SocketAddrV4::new(v4, 0));
                    // SAFETY: sockaddr_in fits inside sockaddr_in6 storage.
                    unsafe { std::ptr::write((&mut addrs[i] as *mut libc::sockaddr_in6).cast(), sa) };
                    size_of::<libc::sockaddr_in>()
                }
                (IpAddr::V6(v6), true) => {
                    addrs[i] = sockaddr_v6(SocketAddrV6::new(v6, 0, 0, 0));
                    size_of::<libc::sockaddr_in6>()
                }
                _ => return Err(io::Error::new(io::ErrorKind::InvalidInput, "address family mismatch")),
            };
            iov[i] = libc::iovec { iov_base: bytes.as_ptr().cast_mut().cast(), iov_len: bytes.len() };
            msgs[i].msg_hdr.msg_name = (&mut addrs[i] as *mut libc::sockaddr_in6).cast();
            msgs[i].msg_hdr.msg_namelen = len as libc::socklen_t;
            msgs[i].msg_hdr.msg_iov = &mut iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
        }
        send_mmsg(&self.fd, &mut msgs[..n])
    }
}

fn send_mmsg(fd: &OwnedFd, msgs: &mut [libc::mmsghdr]) -> io::Result<usize> {
    if msgs.is_empty() {
        return Ok(0);
    }
    // SAFETY: every header in `msgs` points at live iovecs (and addresses)
    // owned by the caller's stack frame for the duration of the call.
    let sent = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), msgs.len() as libc::c_uint, 0) };
    if sent < 0 { Err(io::Error::last_os_error()) } else { Ok(sent as usize) }
}

fn sockaddr_v4(a: SocketAddrV4) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: a.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(a.ip().octets()) },
        sin_zero: [0; 8],
    }
}

fn sockaddr_v6(a: SocketAddrV6) -> libc::sockaddr_in6 {
    libc::sockaddr_in6 {
        sin6_family: libc::AF_INET6 as libc::sa_family_t,
        sin6_port: a.port().to_be(),
        sin6_flowinfo: 0,
        sin6_addr: libc::in6_addr { s6_addr: a.ip().octets() },
        sin6_scope_id: a.scope_id(),
    }
}

/// ARPHRD_ETHER: the link type that takes Ethernet frames.
pub const ARPHRD_ETHER: u16 = 1;

/// An interface's link-layer type (ARPHRD_*) and hardware address.
pub fn interface_hwaddr(name: &str) -> io::Result<(u16, [u8; 6])> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    let fd = socket(libc::AF_INET, libc::SOCK_DGRAM, 0)?;
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq with a NUL-terminated name (checked
    // length above); SIOCGIFHWADDR writes only into it.
    cvt(unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) })?;
    // SAFETY: after SIOCGIFHWADDR the union holds ifru_hwaddr.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (dst, src) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *dst = *src as u8;
    }
    Ok((sa.sa_family, mac))
}

/// Binds a raw IP socket's traffic to one interface.
impl RawIpSocket {
    pub fn bind_to_device(&self, name: &str) -> io::Result<()> {
        let c =
            CString::new(name).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name has NUL"))?;
        let bytes = c.as_bytes_with_nul();
        // SAFETY: `bytes` is live for the call and its length is passed.
        cvt(unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_BINDTODEVICE,
                bytes.as_ptr().cast(),
                bytes.len() as libc::socklen_t,
            )
        })?;
        Ok(())
    }
}

// <linux/if_packet.h>: TPACKET_V3 receive ring.
const PACKET_RX_RING: libc::c_int = 5;
const PACKET_VERSION: libc::c_int = 10;
const TPACKET_V3: libc::c_int = 2;
const TP_STATUS_USER: u32 = 1;
const TP_STATUS_KERNEL: u32 = 0;

#[repr(C)]
#[derive(Clone, Copy)]
struct TpacketReq3 {
    block_size: u32,
    block_nr: u32,
    frame_size: u32,
    frame_nr: u32,
    retire_blk_tov: u32,
    sizeof_priv: u32,
    feature_req_word: u32,
}

/// A TPACKET_V3 receive ring: the kernel copies each accepted packet
/// straight into memory shared with us and hands over whole blocks, so
/// there is no per-packet syscall, copy or wake-up.
#[derive(Debug)]
pub struct RxRing {
    fd: OwnedFd,
    map: *mut u8,
    block_size: usize,
    block_nr: usize,
    next: usize,
}

// SAFETY: the ring is owned by one RxRing and only touched through &mut
// self; the kernel side synchronises through each block's status word.
unsafe impl Send for RxRing {}

impl RxRing {
    /// Opens a ring of `block_nr` blocks of `block_size` bytes (a multiple
    /// of the page size), with `filter` attached before any packet can be
    /// queued, receiving from `ifindex` (0: every interface).
    pub fn open(ifindex: u32, filter: &[BpfInsn], block_size: usize, block_nr: usize) -> io::Result<Self> {
        // Protocol 0: nothing is queued until bind below.
        let fd = socket(libc::AF_PACKET, libc::SOCK_DGRAM, 0)?;
        setsockopt(&fd, libc::SOL_PACKET, PACKET_VERSION, &TPACKET_V3)?;
        let prog = libc::sock_fprog {
            len: u16::try_from(filter.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?,
            filter: filter.as_ptr().cast_mut(),
        };
        setsockopt(&fd, libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)?;
        let frame_size = 2048u32;
        let req = TpacketReq3 {
            block_size: block_size as u32,
            block_nr: block_nr as u32,
            frame_size,
            frame_nr: (block_size * block_nr) as u32 / frame_size,
            // Hand a partly filled block over after 1 ms.
            retire_blk_tov: 1,
            sizeof_priv: 0,
            feature_req_word: 0,
        };
        setsockopt(&fd, libc::SOL_PACKET, PACKET_RX_RING, &req)?;
        let len = block_size * block_nr;
        // SAFETY: maps the ring the kernel just allocated for this socket;
        // the mapping is released in Drop.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ring = Self { fd, map: map.cast(), block_size, block_nr, next: 0 };
        let _ = setsockopt(&ring.fd, libc::SOL_PACKET, PACKET_IGNORE_OUTGOING, &1 as &libc::c_int);
        bind_packet(&ring.fd, ifindex)?;
        Ok(ring)
    }

    pub fn bytes(&self) -> usize {
        self.block_size * self.block_nr
    }

    /// Calls `f` with every packet (from the network header) in the blocks
    /// the kernel has handed over, then hands them back. Returns the number
    /// of packets seen. Never blocks.
    pub fn poll(&mut self, mut f: impl FnMut(&[u8])) -> usize {
        let mut seen = 0;
        for _ in 0..self.block_nr {
            // SAFETY: `next < block_nr`, so the block lies inside the map.
            let block = unsafe { self.map.add(self.next * self.block_size) };
            // SAFETY: offset 8 is the 4-aligned block_status word of the
            // block descriptor, shared with the kernel: read atomically.
            let status = unsafe { &*(block.add(8) as *const std::sync::atomic::AtomicU32) };
            if status.load(std::sync::atomic::Ordering::Acquire) & TP_STATUS_USER == 0 {
                break;
            }
            // SAFETY: the block is ours until its status is reset; the
            // descriptor fields are within the block.
            let (num_pkts, first) = unsafe {
                (std::ptr::read(block.add(12) as *const u32), std::ptr::read(block.add(16) as *const u32) as usize)
            };
            let mut off = first;
            for _ in 0..num_pkts {
                if off + 28 > self.block_size {
                    break;
                }
                // SAFETY: `off` points at a tpacket3_hdr inside the block
                // (checked above); its fields are read unaligned-safe.
                let (next, snaplen, net) = unsafe {
                    let h = block.add(off);
                    (
                        std::ptr::read_unaligned(h as *const u32) as usize,
                        std::ptr::read_unaligned(h.add(12) as *const u32) as usize,
                        std::ptr::read_unaligned(h.add(26) as *const u16) as usize,
                    )
                };
                if off + net + snaplen <= self.block_size {
                    // SAFETY: the packet bytes lie inside the block (checked).
                    let pkt = unsafe { std::slice::from_raw_parts(block.add(off + net), snaplen) };
                    f(pkt);
                    seen += 1;
                }
                if next == 0 {
                    break;
                }
                off += next;
            }
            status.store(TP_STATUS_KERNEL, std::sync::atomic::Ordering::Release);
            self.next = (self.next + 1) % self.block_nr;
        }
        seen
    }

    /// Packets dropped because the ring was full, since the last call.
    pub fn take_drops(&self) -> u64 {
        #[derive(Clone, Copy)]
        #[repr(C)]
        struct TpacketStatsV3 {
            packets: u32,
            drops: u32,
            freeze_q_cnt: u32,
        }
        getsockopt(
            &self.fd,
            libc::SOL_PACKET,
            PACKET_STATISTICS,
            TpacketStatsV3 { packets: 0, drops: 0, freeze_q_cnt: 0 },
        )
        .map(|s| u64::from(s.drops))
        .unwrap_or(0)
    }
}

impl Drop for RxRing {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `open`, once.
        unsafe { libc::munmap(self.map.cast(), self.block_size * self.block_nr) };
    }
}

/// The kernel's answer to "how would you send to this address?" - what
/// `ip route get` prints - covering local addresses, policy rules and every
/// table, which /proc/net/route does not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRoute {
    /// RTN_* type: 1 unicast, 2 local, 3 broadcast, others unreachable.
    pub kind: u8,
    pub oif: u32,
    pub gateway: Option<IpAddr>,
}

pub const RTN_UNICAST: u8 = 1;

/// Asks the kernel (rtnetlink RTM_GETROUTE) how it routes to `dst`.
pub fn route_get(dst: IpAddr) -> io::Result<KernelRoute> {
    const RTM_NEWROUTE: u16 = 24;
    const RTM_GETROUTE: u16 = 26;
    const NLMSG_ERROR: u16 = 2;
    const NLM_F_REQUEST: u16 = 1;
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    const RTA_GATEWAY: u16 = 5;
    let (family, bytes): (u8, Vec<u8>) = match dst {
        IpAddr::V4(v4) => (libc::AF_INET as u8, v4.octets().to_vec()),
        IpAddr::V6(v6) => (libc::AF_INET6 as u8, v6.octets().to_vec()),
    };
    // nlmsghdr (16) + rtmsg (12) + rtattr (4) + address.
    let len = 16 + 12 + 4 + bytes.len();
    let mut req = Vec::with_capacity(len);
    req.extend_from_slice(&(len as u32).to_ne_bytes());
    req.extend_from_slice(&RTM_GETROUTE.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes());
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&[family, (bytes.len() * 8) as u8, 0, 0, 0, 0, 0, 0]);
    req.extend_from_slice(&0u32.to_ne_bytes());
    req.extend_from_slice(&((4 + bytes.len()) as u16).to_ne_bytes());
    req.extend_from_slice(&RTA_DST.to_ne_bytes());
    req.extend_from_slice(&bytes);

    let fd = socket(libc::AF_NETLINK, libc::SOCK_RAW, libc::NETLINK_ROUTE)?;
    set_timeout(&fd, libc::SO_RCVTIMEO, Duration::from_secs(2))?;
    // SAFETY: sockaddr_nl is plain data; zero (pid 0 = the kernel) is valid.
    let mut kernel: libc::sockaddr_nl = unsafe { zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `req` and `kernel` are live for the call; lengths match.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            req.as_ptr().cast(),
            req.len(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 8192];
    // SAFETY: `buf` is a live, writable buffer of the length passed.
    let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if got < 0 {
        return Err(io::Error::last_os_error());
    }
    parse_route_reply(&buf[..got as usize], RTM_NEWROUTE, NLMSG_ERROR, RTA_OIF, RTA_GATEWAY)
}

fn parse_route_reply(msg: &[u8], newroute: u16, error: u16, rta_oif: u16, rta_gateway: u16) -> io::Result<KernelRoute> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed rtnetlink reply");
    let u16_at = |b: &[u8], i: usize| b.get(i..i + 2).map(|s| u16::from_ne_bytes([s[0], s[1]])).ok_or_else(bad);
    let u32_at =
        |b: &[u8], i: usize| b.get(i..i + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]])).ok_or_else(bad);
    let len = (u32_at(msg, 0)? as usize).min(msg.len());
    let kind = u16_at(msg, 4)?;
    if kind == error {
        let errno = u32_at(msg, 16)? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != newroute {
        return Err(bad());
    }
    let rtm = msg.get(16..28).ok_or_else(bad)?;
    let family = rtm[0];
    let mut route = KernelRoute { kind: rtm[7], oif: 0, gateway: None };
    let mut off = 28;
    while off + 4 <= len {
        let rta_len = u16_at(msg, off)? as usize;
        let rta_type = u16_at(msg, off + 2)?;
        if rta_len < 4 || off + rta_len > len {
            break;
        }
        let data = &msg[off + 4..off + rta_len];
        if rta_type == rta_oif && data.len() >= 4 {
            route.oif = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]);
        } else if rta_type == rta_gateway {
            route.gateway = match (family as i32, data.len()) {
                (libc::AF_INET, 4) => Some(IpAddr::from([data[0], data[1], data[2], data[3]])),
                (libc::AF_INET6, 16) => <[u8; 16]>::try_from(data).ok().map(IpAddr::from),
                _ => None,
            };
        }
        off += rta_len.div_ceil(4) * 4;
    }
    Ok(route)
}
