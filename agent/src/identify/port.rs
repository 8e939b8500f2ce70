//! One open port's identification: connect, listen, ask, name.
//!
//! The order follows what servers do: many speak first (SSH, SMTP, FTP,
//! MySQL, VNC, NATS), so the first connection only listens for a short
//! while; then HTTP and TLS, which most of the rest are (TLS first on ports
//! where TLS is usual); then portfleet's protocol probes; then, when
//! nmap's database is loaded and nothing named the port for sure, nmap's
//! probes in nmap's order. Every step opens a fresh connection (servers
//! often close after a request they do not understand), reads at most
//! [`http::MAX_RESPONSE`] bytes with a deadline, and the whole port has
//! one deadline of its own, so a hostile server costs bounded time and
//! memory whatever it does.

use std::{
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use portfleet_core::{Service, service::escape_banner};
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
    time::Instant,
};

use super::{
    Identifier, http,
    nmap::Outcome,
    tls::{self, Alpn},
};

/// Our raw TLS ClientHello probe (for servers rustls cannot talk to): it
/// follows the rustls handshake, never precedes it.
const TLS_HELLO: &str = "tls-hello";

/// Ports where TLS is usual: try it before plain HTTP.
const TLS_PORTS: &[u16] = &[443, 465, 563, 636, 853, 989, 990, 992, 993, 994, 995, 2376, 4443, 5061, 6443, 8443, 9443];

/// How one port is reached: the gate every connection passes.
pub(super) struct Reach<'a> {
    pub ip: IpAddr,
    pub port: u16,
    /// Names the address was resolved from (SNI, HTTP Host).
    pub names: &'a [String],
    pub identifier: &'a Identifier,
    pub gate: &'a super::Gate,
}

impl Reach<'_> {
    fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// A new connection, paid for under the scan's rate.
    async fn connect(&self) -> Option<TcpStream> {
        self.gate.admit().await;
        let timeout = self.identifier.options.connect_timeout;
        match tokio::time::timeout(timeout, TcpStream::connect(self.addr())).await {
            Ok(Ok(s)) => {
                metrics::counter!("portfleet_agent_identify_connections_total", "outcome" => "connected").increment(1);
                let _ = s.set_nodelay(true);
                Some(s)
            }
            _ => {
                metrics::counter!("portfleet_agent_identify_connections_total", "outcome" => "failed").increment(1);
                None
            }
        }
    }

    fn read_timeout(&self) -> Duration {
        self.identifier.options.read_timeout
    }
}

/// Reads what the peer sends until it stops for `idle`, closes, `total`
/// passes, or `max` bytes arrived. What arrived is returned either way.
pub(super) async fn read_some<S: AsyncRead + Unpin>(s: &mut S, total: Duration, max: usize) -> (Vec<u8>, bool) {
    let end = Instant::now() + total;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut closed = false;
    while buf.len() < max {
        // After the first bytes, a short pause means the server is done
        // talking for now.
        let until = if buf.is_empty() { end } else { end.min(Instant::now() + Duration::from_millis(150)) };
        match tokio::time::timeout_at(until, s.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n.min(max - buf.len())]),
            Ok(Err(_)) => {
                closed = true;
                break;
            }
            Err(_) => break,
        }
    }
    (buf, closed)
}

/// Sends `payload` and reads the answer.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, payload: &[u8], wait: Duration) -> Vec<u8> {
    if !payload.is_empty() && s.write_all(payload).await.is_err() {
        return Vec::new();
    }
    let _ = s.flush().await;
    read_some(s, wait, http::MAX_RESPONSE).await.0
}

/// The best answer so far, and what was learned on the way.
#[derive(Default)]
struct Findings {
    service: Option<Service>,
    /// A softmatch from nmap: the service is known, the product not yet.
    soft: Option<Service>,
    banner: Vec<u8>,
    tls: Option<portfleet_core::service::Tls>,
    http: Vec<portfleet_core::service::Http>,
    /// The server closed the first connection without a word.
    wrapped: bool,
}

impl Findings {
    fn named(&self) -> bool {
        self.service.is_some()
    }

    /// Named, and with a version: nothing more to ask.
    fn settled(&self) -> bool {
        self.service.as_ref().is_some_and(|s| !s.version.is_empty())
    }

    /// A hard match, from whichever rule set: the first one names the
    /// port; a later one of the same service replaces it only to add the
    /// version it lacked.
    fn take(&mut self, s: Service) {
        match &self.service {
            None => self.service = Some(s),
            Some(have) if have.name == s.name && have.version.is_empty() && !s.version.is_empty() => {
                let tunnel = have.tunnel.clone();
                self.service = Some(Service { tunnel, ..s });
            }
            Some(_) => {}
        }
    }
}

/// Identifies the port; never fails: what could not be learned is
/// "unknown" with the bytes seen, or unverified when no connection opened.
pub(super) async fn identify(reach: Reach<'_>) -> Service {
    let deadline = Instant::now() + reach.identifier.options.port_deadline;
    let mut found = Findings::default();
    let verified = tokio::time::timeout_at(deadline, steps(&reach, &mut found)).await.unwrap_or(true);
    conclude(&reach, found, verified)
}

/// The steps, in order; returns whether any connection opened.
async fn steps(reach: &Reach<'_>, found: &mut Findings) -> bool {
    let id = reach.identifier;
    // 1. Listen: many services speak first.
    let Some(mut conn) = reach.connect().await else {
        return false;
    };
    let (banner, closed) = read_some(&mut conn, id.options.banner_wait, http::MAX_RESPONSE).await;
    drop(conn);
    let mut asked: Vec<&str> = Vec::new();
    if !banner.is_empty() {
        found.banner = banner.clone();
        match_response(reach, None, &banner, found);
    } else if closed {
        // Accepted and closed without a word (a TCP wrapper, a firewall's
        // proxy): nothing more will be said; nmap calls it tcpwrapped.
        found.wrapped = true;
        return true;
    } else {
        // 2. A service on a port of its own is asked in its protocol
        // first (Redis on 6379): one connection, where HTTP and TLS would
        // cost two more. The raw TLS hello waits for the TLS step.
        for probe in id.rules.probes_for(reach.port).into_iter().filter(|p| p.suits(reach.port)) {
            if probe.name == TLS_HELLO || asked.len() >= id.options.max_probes {
                continue;
            }
            asked.push(&probe.name);
            if !ask(reach, probe, found).await {
                return true;
            }
            if found.named() {
                break;
            }
        }
        // 3. TLS and HTTP, TLS first where it is usual.
        if !found.named() {
            let tls_first =
                TLS_PORTS.contains(&reach.port) || id.nmap.as_ref().is_some_and(|db| db.is_ssl_port(reach.port));
            if tls_first {
                try_tls(reach, found).await;
                if found.tls.is_none() {
                    try_http(reach, found).await;
                }
            } else {
                try_http(reach, found).await;
                if found.http.is_empty() {
                    try_tls(reach, found).await;
                }
            }
        }
    }
    if found.settled() {
        return true;
    }
    // 4. Our other protocol probes: to name the port, or, when something
    // named it without a version, those of this port that can tell it.
    let probes = match &found.service {
        None => id.rules.probes_for(reach.port),
        Some(s) if s.tunnel.is_empty() => id.rules.refining_probes(reach.port, &s.name),
        Some(_) => Vec::new(),
    };
    for probe in probes {
        if asked.contains(&probe.name.as_str()) {
            continue;
        }
        if asked.len() >= id.options.max_probes {
            break;
        }
        asked.push(&probe.name);
        if !ask(reach, probe, found).await {
            break;
        }
        if found.settled() {
            return true;
        }
    }
    if found.named() {
        return true;
    }
    // 5. nmap's probes, in nmap's order.
    if let Some(db) = &id.nmap {
        for probe in db.probes_for(reach.port, found.tls.is_some(), id.options.intensity) {
            if probe.payload.is_empty() {
                continue; // the NULL probe: step 1 listened already
            }
            let Some(conn) = reach.connect().await else { break };
            let wait = probe.total_wait.min(reach.read_timeout());
            let response = if found.tls.is_some() {
                let sni = reach.names.first().map(String::as_str);
                // As nmap's own probes: no application protocol offered.
                match tls::handshake(conn, sni, id.options.connect_timeout, Alpn::None).await {
                    Ok((mut s, _)) => exchange(&mut s, &probe.payload, wait).await,
                    Err(_) => continue,
                }
            } else {
                let mut conn = conn;
                exchange(&mut conn, &probe.payload, wait).await
            };
            if response.is_empty() {
                continue;
            }
            if found.banner.is_empty() {
                found.banner = response.clone();
            }
            match db.match_response(probe, &response, found.soft.as_ref().map(|s| s.name.as_str())) {
                Outcome::Hard(s) => {
                    found.take(s);
                    return true;
                }
                Outcome::Soft(s) => {
                    found.soft.get_or_insert(s);
                }
                Outcome::None => {}
            }
        }
    }
    true
}

/// Sends one of our probes on a fresh connection and matches the answer;
/// false when no connection opened.
async fn ask(reach: &Reach<'_>, probe: &super::rules::Probe, found: &mut Findings) -> bool {
    let Some(mut conn) = reach.connect().await else { return false };
    let response = exchange(&mut conn, &probe.payload, reach.read_timeout()).await;
    if response.is_empty() {
        return true;
    }
    if found.banner.is_empty() {
        found.banner = response.clone();
    }
    match reach.identifier.rules.identify(Some(&probe.name), &response) {
        Some(s) => found.take(s),
        None => match_nmap(reach, Some(&probe.name), &response, found),
    }
    true
}

/// A response matched against both rule sets: nmap's (when loaded)
/// first, since it knows more products; then ours.
fn match_response(reach: &Reach<'_>, probe: Option<&str>, response: &[u8], found: &mut Findings) {
    match_nmap(reach, probe, response, found);
    if !found.named()
        && let Some(s) = reach.identifier.rules.identify(probe, response)
    {
        found.take(s);
    }
}

fn match_nmap(reach: &Reach<'_>, probe: Option<&str>, response: &[u8], found: &mut Findings) {
    let Some(db) = &reach.identifier.nmap else { return };
    let Some(p) = db.probe(probe.unwrap_or("NULL")) else { return };
    match db.match_response(p, response, found.soft.as_ref().map(|s| s.name.as_str())) {
        Outcome::Hard(s) => found.take(s),
        Outcome::Soft(s) => {
            found.soft.get_or_insert(s);
        }
        Outcome::None => {}
    }
}

/// One HTTP request per name the address has (virtual hosts), and one by
/// address when it has none, over `tls` when given.
async fn try_http(reach: &Reach<'_>, found: &mut Findings) {
    let hosts = hosts(reach);
    for host in &hosts {
        let Some(mut conn) = reach.connect().await else { return };
        let url = http::url("http", host, reach.port);
        let response = exchange(&mut conn, &http::request(&authority(host, reach.port)), reach.read_timeout()).await;
        if let Some(h) = http::parse(&response, url) {
            found.http.push(h);
        } else if found.http.is_empty() {
            // Not HTTP: what it said may name it.
            if !response.is_empty() {
                if found.banner.is_empty() {
                    found.banner = response.clone();
                }
                match_response(reach, Some("GetRequest"), &response, found);
            }
            return;
        }
    }
    if let Some(first) = found.http.first() {
        let mut s = http_service(first, "http");
        s.rule = "builtin:http".into();
        found.take(s);
    }
}

/// A TLS handshake, then HTTP inside it for each name; records the
/// certificate whatever is inside.
async fn try_tls(reach: &Reach<'_>, found: &mut Findings) {
    let names = hosts(reach);
    for (i, host) in names.iter().enumerate() {
        let sni = reach.names.get(i).map(String::as_str);
        let Some((stream, info)) = tls_connect(reach, sni, Alpn::Web).await else { return };
        let h2 = info.alpn == "h2";
        if found.tls.is_none() {
            found.tls = Some(info);
        }
        // The server chose HTTP/2: the request below is HTTP/1.1, so it is
        // asked on a connection that offers only that.
        let mut stream = match h2 {
            true => match tls_connect(reach, sni, Alpn::Http1).await {
                Some((stream, _)) => stream,
                None => return,
            },
            false => stream,
        };
        let response = exchange(&mut stream, &http::request(&authority(host, reach.port)), reach.read_timeout()).await;
        match http::parse(&response, http::url("https", host, reach.port)) {
            Some(h) => found.http.push(h),
            None if i == 0 => {
                // TLS around something else (IMAPS, a TLS-only service):
                // its greeting or answer may name it.
                if !response.is_empty() {
                    found.banner = response.clone();
                    match_response(reach, None, &response, found);
                    if let Some(s) = &mut found.service {
                        s.tunnel = "ssl".into();
                    }
                }
                return;
            }
            None => {}
        }
    }
    if let Some(first) = found.http.first() {
        let mut s = http_service(first, "https");
        s.tunnel = "ssl".into();
        s.rule = "builtin:https".into();
        found.take(s);
    }
}

/// A fresh connection and a TLS handshake offering `alpn`, then, if the
/// server refused those protocols, one offering none.
async fn tls_connect(
    reach: &Reach<'_>,
    sni: Option<&str>,
    alpn: Alpn,
) -> Option<(tokio_rustls::client::TlsStream<TcpStream>, portfleet_core::service::Tls)> {
    for alpn in [alpn, Alpn::None] {
        let conn = reach.connect().await?;
        match tls::handshake(conn, sni, reach.identifier.options.connect_timeout, alpn).await {
            Ok(done) => return Some(done),
            Err(tls::TlsFailure::NoSharedAlpn) if alpn != Alpn::None => continue,
            Err(_) => return None,
        }
    }
    None
}

/// The names to ask as (each name; the address when there are none).
fn hosts(reach: &Reach<'_>) -> Vec<String> {
    if reach.names.is_empty() {
        vec![reach.ip.to_string()]
    } else {
        reach.names.iter().take(portfleet_core::service::MAX_HTTP).cloned().collect()
    }
}

/// `Host:` value: the name, with the port unless it is the scheme's.
fn authority(host: &str, port: u16) -> String {
    let host = match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => host.to_string(),
    };
    if port == 80 || port == 443 { host } else { format!("{host}:{port}") }
}

/// "nginx/1.22.1 (Debian)" -> product "nginx", version "1.22.1".
fn http_service(h: &portfleet_core::service::Http, name: &str) -> Service {
    let mut s = Service { name: name.into(), confidence: 10, method: "probed".into(), ..Service::default() };
    let server = h.server.split_whitespace().next().unwrap_or("");
    match server.split_once('/') {
        Some((product, version)) => {
            s.product = product.to_string();
            s.version = version.to_string();
        }
        None => s.product = server.to_string(),
    }
    s
}

/// The answer: the best match, or a softmatch, or "tcpwrapped", or what
/// the port usually is (as nmap: `method` "table", confidence 3), or
/// "unknown" - with the bytes seen; TLS and HTTP details attached to any.
fn conclude(reach: &Reach<'_>, found: Findings, verified: bool) -> Service {
    let Findings { service, soft, banner, tls, http, wrapped } = found;
    let guess = || {
        let mut s = Service::unknown(&[], verified);
        if let Some(name) = reach.identifier.guess(reach.port) {
            s.name = name.to_string();
            s.method = "table".into();
            s.confidence = 3;
        }
        s
    };
    let mut s = match (service, soft) {
        (Some(s), _) => s,
        (None, Some(soft)) => soft,
        (None, None) if !verified => return guess(),
        (None, None) if wrapped && banner.is_empty() && tls.is_none() => {
            Service { name: "tcpwrapped".into(), confidence: 8, method: "probed".into(), ..Service::default() }
        }
        (None, None) => guess(),
    };
    if s.name == "http" && tls.is_some() {
        s.name = "https".into();
    }
    if tls.is_some() && s.tunnel.is_empty() {
        s.tunnel = "ssl".into();
    }
    s.tls = tls;
    s.http = http;
    s.banner = escape_banner(&banner);
    s.verified = verified;
    s.bounded()
}
