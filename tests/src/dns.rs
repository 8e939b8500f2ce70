//! A small real DNS server (UDP, port 53 on a loopback address of its
//! own) whose answers the test controls, and a way to run a process whose
//! system resolver uses it: a private mount namespace with its own
//! `/etc/resolv.conf`. Needs root (CI runs as root).
//!
//! Every `A` query is answered with [`DnsServer::ANSWER`]; names under
//! `slow.test.` are answered after the configured delay. `AAAA` queries
//! get an empty answer at once.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::Duration,
};

use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

pub struct DnsServer {
    pub addr: Ipv4Addr,
    resolv_conf: tempfile::NamedTempFile,
    stop: CancellationToken,
}

impl DnsServer {
    /// What every A query resolves to (TEST-NET-2: never probed).
    pub const ANSWER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);

    /// Serves on a random 127.53.x.y:53, answering `*.slow.test` after
    /// `slow_delay`. Panics with the reason when it cannot (not root).
    pub async fn start(slow_delay: Duration) -> Self {
        let addr = Ipv4Addr::new(127, 53, rand::random_range(1..255), rand::random_range(1..255));
        let socket = UdpSocket::bind(SocketAddr::from((addr, 53)))
            .await
            .unwrap_or_else(|e| panic!("bind {addr}:53 for the test DNS server (needs root): {e}"));
        let socket = Arc::new(socket);
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            loop {
                let (n, from) = tokio::select! {
                    _ = token.cancelled() => return,
                    r = socket.recv_from(&mut buf) => match r { Ok(r) => r, Err(_) => return },
                };
                let Some((reply, slow)) = answer(&buf[..n]) else { continue };
                let socket = socket.clone();
                tokio::spawn(async move {
                    if slow {
                        tokio::time::sleep(slow_delay).await;
                    }
                    let _ = socket.send_to(&reply, from).await;
                });
            }
        });
        let mut resolv_conf = tempfile::NamedTempFile::new().expect("resolv.conf");
        std::io::Write::write_all(
            &mut resolv_conf,
            format!("nameserver {addr}\noptions timeout:30 attempts:1\n").as_bytes(),
        )
        .expect("write resolv.conf");
        Self { addr, resolv_conf, stop }
    }

    /// `program args...` in a private mount namespace where
    /// `/etc/resolv.conf` names this server.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/resolv.conf && exec "$@""#)
            .arg(self.resolv_conf.path())
            .arg(program);
        cmd
    }

    pub fn resolv_conf(&self) -> PathBuf {
        self.resolv_conf.path().to_path_buf()
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// The reply to one query and whether it is a slow name.
fn answer(q: &[u8]) -> Option<(Vec<u8>, bool)> {
    if q.len() < 12 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // The question: labels up to a zero byte, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *q.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*q.get(i)?, *q.get(i + 1)?]);
    let question = &q[12..i + 4];
    let slow = labels.len() >= 2 && labels[labels.len() - 2..] == ["slow", "test"];
    let a = qtype == 1;
    let mut r = Vec::with_capacity(64);
    r.extend_from_slice(&q[0..2]);
    r.extend_from_slice(&[0x81, 0x80]); // response, recursion desired and available, NOERROR
    r.extend_from_slice(&[0, 1, 0, u8::from(a), 0, 0, 0, 0]);
    r.extend_from_slice(question);
    if a {
        r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&DnsServer::ANSWER.octets());
    }
    Some((r, slow && a))
}

/// An `/etc/hosts` of the test's own, and a way to run a process whose
/// system resolver reads it (a private mount namespace, as
/// [`DnsServer::command`]). Names resolve in the file's order, so the
/// first line of a name is its first address.
pub struct HostsFile {
    file: tempfile::NamedTempFile,
}

impl HostsFile {
    /// `entries`: (address, name) lines.
    pub fn new(entries: &[(&str, &str)]) -> Self {
        let mut file = tempfile::NamedTempFile::new().expect("hosts file");
        let mut text = String::from("127.0.0.1 localhost\n::1 localhost\n");
        for (ip, name) in entries {
            text.push_str(&format!("{ip} {name}\n"));
        }
        std::io::Write::write_all(&mut file, text.as_bytes()).expect("write hosts file");
        Self { file }
    }

    /// `program args...` with `/etc/hosts` replaced by this file.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(r#"mount --bind "$0" /etc/hosts && exec "$@""#)
            .arg(self.file.path())
            .arg(program);
        cmd
    }
}
