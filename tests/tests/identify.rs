//! Service identification end to end: real daemons from Debian's packages
//! (nginx with HTTP and HTTPS, OpenSSH, vsftpd, Redis, Mosquitto,
//! memcached, NATS) and hostile servers, all in the target namespace; a
//! controller here and an agent in the scanner namespace; every open port
//! must come back named, with the version where the protocol gives one,
//! the certificate the test made, and the page nginx serves - with the
//! built-in rules and with nmap's database. `scripts/test.sh` installs the
//! daemons; under `CI=true` a missing one fails the test.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use portfleet_core::Service;
use portfleet_proto::{auth::ApiClient, v1 as pb};
use portfleet_tests::{
    TestDb,
    netns::{Listeners, NetTopology},
    procs::{self, Proc, free_port},
};
use sqlx::Connection as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::Channel;
use uuid::Uuid;

const CTL_ARGS: &[&str] =
    &["--lease-ttl", "2s", "--heartbeat-interval", "500ms", "--allow", "198.18.0.0/15,2001:db8::/32"];
/// Short identification deadlines keep the hostile servers' cost low.
const AGENT_ARGS: &[&str] =
    &["--identify-read-timeout", "1s", "--identify-connect-timeout", "1s", "--identify-deadline", "8s"];

const WEB: &str = "198.18.1.10";
const SSH: &str = "198.18.1.11";
const REDIS: &str = "198.18.1.12";
const MQTT: &str = "198.18.1.13";
const FTP: &str = "198.18.1.14";
const MEMCACHED: &str = "198.18.1.15";
const NATS: &str = "198.18.1.16";
const HOSTILE: &str = "198.18.1.20";
/// Live, with nothing listening: every port closed.
const CLOSED: &str = "198.18.1.40";
/// Answers on [`TARPIT_PORTS`] ports, more than the scan's threshold.
const TARPIT: &str = "198.18.1.21";
const TARPIT_PORTS: std::ops::Range<u16> = 10_000..10_040;
const THRESHOLD: u32 = 20;

fn daemon_path(name: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/usr/local/sbin", "/usr/local/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.exists())
}

/// The daemons this test runs, or `None` (a panic under CI) when one is
/// missing.
fn daemons_present() -> bool {
    let missing: Vec<&str> = ["nginx", "sshd", "vsftpd", "redis-server", "mosquitto", "memcached", "nats-server"]
        .into_iter()
        .filter(|d| daemon_path(d).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    let msg = format!("missing test daemons {missing:?}: run scripts/test.sh (it installs them) as root");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true and {msg}");
    eprintln!("skipping: {msg}");
    false
}

/// The certificate nginx serves: made here, compared field by field.
struct WebCert {
    der: Vec<u8>,
    cert_pem: String,
    key_pem: String,
}

fn web_cert() -> WebCert {
    let mut params =
        rcgen::CertificateParams::new(vec!["app.test".to_string(), "www.app.test".to_string()]).expect("params");
    params.distinguished_name.push(rcgen::DnType::CommonName, "app.test");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("self-signed");
    WebCert { der: cert.der().to_vec(), cert_pem: cert.pem(), key_pem: key.serialize_pem() }
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Real daemons in the target namespace, each in the foreground so that
/// killing it (on drop) leaves nothing behind.
struct Daemons {
    _procs: Vec<Proc>,
    _listeners: Vec<Listeners>,
}

fn in_target(topo: &NetTopology, program: &Path) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &topo.target]).arg(program);
    cmd
}

fn start_daemons(topo: &NetTopology, dir: &Path, logs: &tempfile::TempDir, cert: &WebCert) -> Daemons {
    let mut procs = Vec::new();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // nginx: two virtual hosts on HTTP and HTTPS, each page titled by its
    // name, and one by address.
    let www = dir.join("www");
    for (site, title) in [("app", "App test page"), ("www", "WWW test page"), ("default", "portfleet test page")] {
        std::fs::create_dir_all(www.join(site)).unwrap();
        std::fs::write(
            www.join(site).join("index.html"),
            format!("<html><head><title>{title}</title></head><body>hi</body></html>"),
        )
        .unwrap();
    }
    let crt = write("web.crt", &cert.cert_pem);
    let key = write("web.key", &cert.key_pem);
    let d = dir.display();
    let nginx = write(
        "nginx.conf",
        &format!(
            "daemon off; master_process off; user root; pid {d}/nginx.pid; error_log {d}/nginx.err;
             events {{ worker_connections 256; }}
             http {{ access_log off; client_body_temp_path {d}/tmp; proxy_temp_path {d}/tmp;
               fastcgi_temp_path {d}/tmp; uwsgi_temp_path {d}/tmp; scgi_temp_path {d}/tmp;
               server {{ listen {WEB}:80 default_server; listen {WEB}:443 ssl default_server;
                 ssl_certificate {crt}; ssl_certificate_key {key}; root {d}/www/default; }}
               server {{ listen {WEB}:80; listen {WEB}:443 ssl; server_name app.test;
                 ssl_certificate {crt}; ssl_certificate_key {key}; root {d}/www/app; }}
               server {{ listen {WEB}:80; listen {WEB}:443 ssl; server_name www.app.test;
                 ssl_certificate {crt}; ssl_certificate_key {key}; root {d}/www/www; }}
             }}",
            crt = crt.display(),
            key = key.display()
        ),
    );
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let mut cmd = in_target(topo, &daemon_path("nginx").unwrap());
    cmd.arg("-c").arg(&nginx).arg("-p").arg(dir);
    procs.push(Proc::spawn_command("nginx", cmd, logs));

    // sshd, with a host key of its own.
    let host_key = dir.join("ssh_host_ed25519_key");
    let keygen = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .status()
        .expect("ssh-keygen");
    assert!(keygen.success());
    std::fs::create_dir_all("/run/sshd").unwrap();
    let mut cmd = in_target(topo, &daemon_path("sshd").unwrap());
    cmd.args(["-D", "-e", "-f", "/dev/null", "-o", &format!("ListenAddress={SSH}:22"), "-o", "PidFile=none", "-h"])
        .arg(&host_key);
    procs.push(Proc::spawn_command("sshd", cmd, logs));

    let mut cmd = in_target(topo, &daemon_path("redis-server").unwrap());
    cmd.args(["--bind", REDIS, "--port", "6379", "--save", "", "--appendonly", "no", "--protected-mode", "no"]);
    cmd.arg("--dir").arg(dir);
    procs.push(Proc::spawn_command("redis", cmd, logs));

    let mosquitto = write("mosquitto.conf", &format!("listener 1883 {MQTT}\nallow_anonymous true\n"));
    let mut cmd = in_target(topo, &daemon_path("mosquitto").unwrap());
    cmd.arg("-c").arg(mosquitto);
    procs.push(Proc::spawn_command("mosquitto", cmd, logs));

    std::fs::create_dir_all(dir.join("empty")).unwrap();
    let vsftpd = write(
        "vsftpd.conf",
        &format!(
            "listen=YES\nlisten_ipv6=NO\nlisten_address={FTP}\nbackground=NO\nanonymous_enable=YES\n\
             no_anon_password=YES\nanon_root={d}/empty\nlocal_enable=NO\nsecure_chroot_dir={d}/empty\n\
             run_as_launching_user=YES\n"
        ),
    );
    let mut cmd = in_target(topo, &daemon_path("vsftpd").unwrap());
    cmd.arg(vsftpd);
    procs.push(Proc::spawn_command("vsftpd", cmd, logs));

    let mut cmd = in_target(topo, &daemon_path("memcached").unwrap());
    cmd.args(["-u", "root", "-l", MEMCACHED, "-p", "11211", "-U", "0"]);
    procs.push(Proc::spawn_command("memcached", cmd, logs));

    let mut cmd = in_target(topo, &daemon_path("nats-server").unwrap());
    cmd.args(["-a", NATS, "-p", "4222"]);
    procs.push(Proc::spawn_command("nats", cmd, logs));

    Daemons { _procs: procs, _listeners: hostile_servers(topo) }
}

/// Servers that misbehave, each on its own port of [`HOSTILE`].
fn hostile_servers(topo: &NetTopology) -> Vec<Listeners> {
    let at = |port| SocketAddr::new(HOSTILE.parse().unwrap(), port);
    let tarpit: Vec<SocketAddr> = TARPIT_PORTS.map(|p| SocketAddr::new(TARPIT.parse().unwrap(), p)).collect();
    let mut servers = vec![topo.listen_in(&topo.target, &tarpit)];
    servers.extend([
        // Endless data.
        topo.serve(at(7001), |mut s| async move {
            let chunk = vec![b'A'; 64 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
        }),
        // Silence, with the connection held open.
        topo.serve(at(7002), |mut s| async move {
            let mut buf = [0u8; 1024];
            while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        }),
        // One byte a second, forever.
        topo.serve(at(7003), |mut s| async move {
            while s.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }),
        // A TLS port that closes mid-handshake: a ServerHello record's
        // first bytes, then nothing.
        topo.serve(at(8443), |mut s| async move {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&[0x16, 0x03, 0x03, 0x00, 0x7a, 0x02, 0x00]).await;
        }),
        // Garbage where TLS is expected.
        topo.serve(at(443), |mut s| async move {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let _ = s.write_all(&[0xde, 0xad, 0xbe, 0xef].repeat(4096)).await;
        }),
        // HTTP with a huge, malformed header.
        topo.serve(at(80), |mut s| async move {
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await;
            let mut response = b"HTTP/1.1 200 OK\r\nX-Huge: ".to_vec();
            response.extend(std::iter::repeat_n(b'h', 1 << 20));
            response.extend_from_slice(b"\r\n\x00\xff\r\n\r\n<title>never seen</title>");
            let _ = s.write_all(&response).await;
        }),
    ]);
    servers
}

struct Setup {
    controllers: Vec<Proc>,
    agents: Vec<Proc>,
    _daemons: Daemons,
    topo: NetTopology,
    db: TestDb,
    hosts: PathBuf,
    _dir: tempfile::TempDir,
    logs: tempfile::TempDir,
    cert: WebCert,
}

impl Setup {
    async fn new() -> Option<Self> {
        portfleet_tests::init_tracing();
        if !daemons_present() {
            return None;
        }
        let topo = NetTopology::create_with_controller_link()?;
        let db = TestDb::create().await;
        let logs = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert = web_cert();
        let daemons = start_daemons(&topo, dir.path(), &logs, &cert);
        // The controller resolves the scan's names through this hosts file
        // (a private mount namespace, see `start_controller`).
        let hosts = dir.path().join("hosts");
        std::fs::write(
            &hosts,
            format!(
                "127.0.0.1 localhost\n{WEB} app.test\n{WEB} www.app.test\n{SSH} ssh.app.test\n{CLOSED} closed.app.test\n\
                 {SSH} disabled.app.test\n{SSH} other.app.test\n"
            ),
        )
        .unwrap();
        Some(Self {
            controllers: Vec::new(),
            agents: Vec::new(),
            _daemons: daemons,
            topo,
            db,
            hosts,
            _dir: dir,
            logs,
            cert,
        })
    }

    fn start_controller(&mut self) -> String {
        self.start_controller_with(&[])
    }

    fn start_controller_with(&mut self, extra: &[&str]) -> String {
        let ip = IpAddr::V4(self.topo.controller_ip.expect("management link"));
        let port = free_port(ip);
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", r#"mount --bind "$0" /etc/hosts && exec "$@""#])
            .arg(&self.hosts)
            .arg(portfleet_tests::binary("portfleet-controller"))
            .args(["serve", "--insecure", "--database-url", self.db.url(), "--listen", &format!("{ip}:{port}")])
            .args(CTL_ARGS)
            .args(extra)
            .env_remove("DATABASE_URL");
        self.controllers.push(Proc::spawn_command("controller", cmd, &self.logs));
        format!("http://{ip}:{port}")
    }

    fn start_agent(&mut self, name: &str, url: &str, extra: &[&str]) {
        let args: Vec<&str> = AGENT_ARGS.iter().chain(extra).copied().collect();
        self.agents.push(procs::agent(&self.topo, name, url, &args, &self.logs));
    }

    async fn client(&self, url: &str) -> ApiClient {
        let url = url.to_string();
        let channel = portfleet_tests::eventually("the controller to answer", Duration::from_secs(30), || {
            let url = url.clone();
            async move { Channel::from_shared(url).ok()?.connect().await.ok() }
        })
        .await;
        let token = self.db.token(portfleet_controller::auth::Scope::Admin).await;
        portfleet_proto::auth::client(channel, portfleet_proto::auth::Bearer::new(&token).unwrap())
    }
}

/// Scans the daemons and the hostile servers; returns each open port's
/// service.
async fn scan(api: &mut ApiClient, request_id: &str) -> (pb::Scan, HashMap<(String, u32), pb::Result>) {
    let scan = api
        .create_scan(pb::CreateScanRequest {
            targets: vec![format!("{WEB}-{TARPIT}"), "app.test".into(), "www.app.test".into()],
            ports: format!(
                "21,22,80,443,1883,4222,6379,7001-7003,8443,11211,{}-{}",
                TARPIT_PORTS.start,
                TARPIT_PORTS.end - 1
            ),
            port_threshold: Some(THRESHOLD),
            rate: 2000,
            request_id: request_id.into(),
            ..Default::default()
        })
        .await
        .expect("create scan")
        .into_inner();
    let started = Instant::now();
    let done = portfleet_tests::eventually("the scan to end", Duration::from_secs(120), || {
        let (mut api, id) = (api.clone(), scan.id.clone());
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (s.state != pb::ScanState::Pending as i32 && s.state != pb::ScanState::Running as i32).then_some(s)
        }
    })
    .await;
    eprintln!("scan {request_id} took {:?}", started.elapsed());
    assert_eq!(done.state, pb::ScanState::Completed as i32, "{done:?}");
    let results = results_of(api, &scan.id).await;
    (done, results.into_iter().map(|r| ((r.ip.clone(), r.port), r)).collect())
}

/// A scan's results (one page: these scans have fewer than 1,000).
async fn results_of(api: &mut ApiClient, scan_id: &str) -> Vec<pb::Result> {
    let request = pb::ListResultsRequest { scan_id: scan_id.into(), page_size: 1000, ..Default::default() };
    api.list_results(request).await.expect("ListResults").into_inner().results
}

fn service(results: &HashMap<(String, u32), pb::Result>, ip: &str, port: u32) -> Service {
    let r = results.get(&(ip.to_string(), port)).unwrap_or_else(|| panic!("no result for {ip}:{port}: {results:?}"));
    let s = r.service.clone().unwrap_or_else(|| panic!("{ip}:{port} not identified: {r:?}"));
    Service::from(s)
}

/// What every run must show, whichever rules identify.
fn check_daemons(results: &HashMap<(String, u32), pb::Result>, cert: &WebCert) {
    let named = |ip, port| service(results, ip, port);
    let ssh = named(SSH, 22);
    assert_eq!((ssh.name.as_str(), ssh.product.as_str()), ("ssh", "OpenSSH"), "{ssh:?}");
    assert!(ssh.version.starts_with("9."), "{ssh:?}");
    assert!(ssh.verified && ssh.banner.starts_with("SSH-2.0-OpenSSH_9"), "{ssh:?}");

    let web = named(WEB, 80);
    assert_eq!((web.name.as_str(), web.product.as_str()), ("http", "nginx"), "{web:?}");
    assert!(web.version.starts_with("1."), "{web:?}");
    // One identification per virtual host: each name's own page.
    let titles: HashMap<&str, (&str, u16)> =
        web.http.iter().map(|h| (h.url.as_str(), (h.title.as_str(), h.status))).collect();
    assert_eq!(titles.get("http://app.test"), Some(&("App test page", 200)), "{web:?}");
    assert_eq!(titles.get("http://www.app.test"), Some(&("WWW test page", 200)), "{web:?}");

    let tls_web = named(WEB, 443);
    assert_eq!(tls_web.name, "https", "{tls_web:?}");
    assert_eq!(tls_web.tunnel, "ssl");
    let tls = tls_web.tls.as_ref().expect("tls details");
    assert_eq!(tls.subject_cn, "app.test");
    assert_eq!(tls.sans, vec!["app.test".to_string(), "www.app.test".to_string()]);
    assert_eq!(tls.sha256, sha256_hex(&cert.der));
    assert!(tls.self_signed, "{tls:?}");
    assert!(tls.version.starts_with("TLSv1."), "{tls:?}");
    assert!(tls.not_after > tls.not_before, "{tls:?}");
    let titles: Vec<(&str, &str)> = tls_web.http.iter().map(|h| (h.url.as_str(), h.title.as_str())).collect();
    assert!(titles.contains(&("https://app.test", "App test page")), "{titles:?}");
    assert!(titles.contains(&("https://www.app.test", "WWW test page")), "{titles:?}");

    let ftp = named(FTP, 21);
    assert_eq!((ftp.name.as_str(), ftp.product.as_str(), ftp.version.as_str()), ("ftp", "vsftpd", "3.0.3"), "{ftp:?}");
    let redis = named(REDIS, 6379);
    assert_eq!(redis.name, "redis", "{redis:?}");
    let mqtt = named(MQTT, 1883);
    assert_eq!(mqtt.name, "mqtt", "{mqtt:?}");
    let memcached = named(MEMCACHED, 11211);
    assert_eq!(memcached.name, "memcached", "{memcached:?}");
    assert!(memcached.version.starts_with("1.6"), "{memcached:?}");
    let nats = named(NATS, 4222);
    assert_eq!(nats.name, "nats", "{nats:?}");
}

/// Each hostile server ends in a result, bounded, whatever it did.
fn check_hostile(results: &HashMap<(String, u32), pb::Result>) {
    for port in [80, 443, 7001, 7002, 7003, 8443] {
        let s = service(results, HOSTILE, port);
        assert!(s.banner.len() <= portfleet_core::service::MAX_BANNER, "{port}: {s:?}");
        assert!(s.verified, "{port}: {s:?}");
        assert_ne!(s.name, "", "{port}: {s:?}");
    }
    // The host answering on more ports than the threshold: every one of
    // its ports marked, at most the threshold of them identified.
    let tarpit: Vec<&pb::Result> = results.values().filter(|r| r.ip == TARPIT).collect();
    assert_eq!(tarpit.len(), TARPIT_PORTS.len());
    assert!(tarpit.iter().all(|r| r.host_answers_everything), "{tarpit:?}");
    let identified = tarpit.iter().filter(|r| r.service.is_some()).count();
    assert!(identified <= THRESHOLD as usize, "{identified} of a tarpit's ports identified");
    assert!(results.values().filter(|r| r.ip != TARPIT).all(|r| !r.host_answers_everything));
    let endless = service(results, HOSTILE, 7001);
    assert!(endless.banner.starts_with("AAAA"), "{endless:?}");
    let huge = service(results, HOSTILE, 80);
    assert!(huge.http.iter().all(|h| h.title != "never seen"), "{huge:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_service_is_named_with_the_built_in_rules_and_with_nmap_s_database() {
    let Some(mut s) = Setup::new().await else { return };
    let url = s.start_controller();
    s.start_agent("builtin", &url, &["--nmap-service-probes", "none"]);
    let mut api = s.client(&url).await;
    let (_, results) = scan(&mut api, "builtin").await;
    check_daemons(&results, &s.cert);
    check_hostile(&results);
    let rules: Vec<String> = results.values().filter_map(|r| r.service.as_ref()).map(|s| s.rule.clone()).collect();
    assert!(rules.iter().all(|r| !r.starts_with("nmap:")), "{rules:?}");

    // The same scan with nmap's database (its default place).
    let nmap = Path::new("/usr/share/nmap/nmap-service-probes");
    if !nmap.exists() {
        assert!(std::env::var("CI").as_deref() != Ok("true"), "CI=true and nmap is not installed");
        return;
    }
    s.agents.pop().unwrap().terminate(Duration::from_secs(10));
    s.start_agent("nmap", &url, &[]);
    let (_, results) = scan(&mut api, "nmap").await;
    check_daemons(&results, &s.cert);
    check_hostile(&results);
    let rules: Vec<String> = results.values().filter_map(|r| r.service.as_ref()).map(|s| s.rule.clone()).collect();
    assert!(rules.iter().any(|r| r.starts_with("nmap:")), "{rules:?}");
}

/// Banners that take most of a second each, on many ports: the agent is killed
/// while identifying; the next one resumes the shard, and every port ends
/// with exactly one result, identified.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_killed_mid_identification_loses_and_doubles_nothing() {
    let Some(mut s) = Setup::new().await else { return };
    let slow: Vec<Listeners> = (9000..9040)
        .map(|port| {
            s.topo.serve(SocketAddr::new("198.18.1.30".parse().unwrap(), port), |mut c| async move {
                // Within the agent's banner wait (its read timeout, 1 s).
                tokio::time::sleep(Duration::from_millis(700)).await;
                let _ = c.write_all(b"SSH-2.0-OpenSSH_9.2p1 Slow\r\n").await;
                tokio::time::sleep(Duration::from_secs(5)).await;
            })
        })
        .collect();
    let url = s.start_controller();
    s.start_agent("first", &url, &["--nmap-service-probes", "none", "--identify-per-host", "2"]);
    let mut api = s.client(&url).await;
    let scan = api
        .create_scan(pb::CreateScanRequest {
            targets: vec!["198.18.1.30".into()],
            ports: "9000-9039".into(),
            request_id: "slow".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Some ports identified and committed, most still in the agent.
    portfleet_tests::eventually("the first identified results", Duration::from_secs(60), || {
        let (mut api, id) = (api.clone(), scan.id.clone());
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (s.open_ports >= 4).then_some(())
        }
    })
    .await;
    s.agents[0].kill9();
    s.start_agent("second", &url, &["--nmap-service-probes", "none", "--identify-per-host", "8"]);
    let done = portfleet_tests::eventually("the scan to complete", Duration::from_secs(120), || {
        let (mut api, id) = (api.clone(), scan.id.clone());
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (s.state == pb::ScanState::Completed as i32).then_some(s)
        }
    })
    .await;
    let results = results_of(&mut api, &scan.id).await;
    assert_eq!(done.open_ports, 40, "{done:?}");
    assert_eq!(results.len(), 40);
    for r in &results {
        let svc = r.service.as_ref().unwrap_or_else(|| panic!("{r:?} not identified"));
        assert_eq!((svc.name.as_str(), svc.product.as_str()), ("ssh", "OpenSSH"), "{r:?}");
    }
    drop(slow);
}

/// NaabuM8's database: its tables, a domain enabled and one not, their
/// hostnames, and the rows an earlier NaabuM8 run left.
struct NaabuM8 {
    db: TestDb,
    ids: HashMap<&'static str, Uuid>,
}

impl NaabuM8 {
    async fn create() -> Self {
        let db = TestDb::create().await;
        let mut conn = db.connect().await;
        sqlx::raw_sql(include_str!("../fixtures/naabum8.sql")).execute(&mut conn).await.expect("NaabuM8's tables");
        let (on, off) = (Uuid::new_v4(), Uuid::new_v4());
        sqlx::query(
            "INSERT INTO cptm8domain (name, enabled, id) VALUES ('app.test', true, $1), ('other.test', false, $2)",
        )
        .bind(on)
        .bind(off)
        .execute(&mut conn)
        .await
        .unwrap();
        let mut ids = HashMap::new();
        for (name, enabled, domain) in [
            ("app.test", true, on),
            ("www.app.test", true, on),
            ("ssh.app.test", true, on),
            ("closed.app.test", true, on),
            // Resolves nowhere: skipped, as naabu skipped it.
            ("gone.app.test", true, on),
            // Not scanned: disabled, or of a disabled domain.
            ("disabled.app.test", false, on),
            ("other.app.test", true, off),
        ] {
            let id = Uuid::new_v4();
            sqlx::query(
                "INSERT INTO cptm8hostname (name, foundfirsttime, enabled, domainid, id) VALUES ($1, now(), $2, $3, $4)",
            )
            .bind(name)
            .bind(enabled)
            .bind(domain)
            .bind(id)
            .execute(&mut conn)
            .await
            .unwrap();
            ids.insert(name, id);
        }
        // What an earlier run left.
        for (ip, service, port, tls, live, host) in [
            // Closed now: no longer live.
            (WEB, "ftp", 21, false, true, "app.test"),
            // Open again: live, its service renamed, its first `tls` kept.
            (WEB, "oldname", 443, false, false, "app.test"),
            // A hostname with no open port this time keeps its rows.
            (CLOSED, "http", 80, false, true, "closed.app.test"),
        ] {
            sqlx::query(
                "INSERT INTO cptm8service (ipaddress, protocol, service, port, tls, live, hostnameid)
                 VALUES ($1, 'tcp', $2, $3, $4, $5, $6)",
            )
            .bind(ip)
            .bind(service)
            .bind(port)
            .bind(tls)
            .bind(live)
            .bind(ids[host])
            .execute(&mut conn)
            .await
            .unwrap();
        }
        for (url, live, host) in [
            // Not seen: no longer live, whether its hostname had open ports or not.
            ("http://app.test:8080", true, "app.test"),
            ("http://closed.app.test", true, "closed.app.test"),
            // Seen again, stored under another hostname: live, left there.
            ("https://www.app.test", false, "app.test"),
        ] {
            sqlx::query("INSERT INTO cptm8endpoint (endpoint, live, hostnameid) VALUES ($1, $2, $3)")
                .bind(url)
                .bind(live)
                .bind(ids[host])
                .execute(&mut conn)
                .await
                .unwrap();
        }
        Self { db, ids }
    }

    fn name_of(&self, id: Uuid) -> &'static str {
        self.ids.iter().find(|(_, v)| **v == id).map(|(k, _)| *k).expect("a known hostname id")
    }
}

/// A NaabuM8 `get.scan` over RabbitMQ, with NaabuM8's database: the scan
/// covers the enabled hostnames of enabled domains (skipping one that does
/// not resolve), and before the completion message goes out NaabuM8's
/// tables hold exactly the rows NaabuM8 would have written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_naabum8_scan_writes_the_rows_naabum8_would_have() {
    let Some(mut s) = Setup::new().await else { return };
    let naabu = NaabuM8::create().await;
    let broker = portfleet_tests::amqp::TestBroker::new().await;
    let c = broker.config.clone();
    let n = c.naabum8.clone().unwrap();
    let mut args = broker.naabum8_controller_args();
    args.extend(["--naabum8-database-url", naabu.db.url(), "--naabum8-ports", "21,22,80,443"].map(String::from));
    let url = s.start_controller_with(&args.iter().map(String::as_str).collect::<Vec<_>>());
    s.start_agent("naabu", &url, &["--nmap-service-probes", "none"]);
    broker.wait_ready().await;
    let mut completions = broker.listen(&n.exchange, &n.completion_key).await;
    let envelope = br#"{"channel":"cptm8.naabum8.get.scan","payload":null,"timestamp":"2026-12-01T00:00:00Z","source":"orchestrator"}"#;
    let props = lapin::BasicProperties::default().with_message_id("naabu-run-1".into()).with_delivery_mode(2);
    broker.publish(&n.exchange, "cptm8.naabum8.get.scan", envelope, props).await;
    let (_, body, _) = tokio::time::timeout(Duration::from_secs(120), completions.recv())
        .await
        .expect("the completion message")
        .expect("a message");
    let done: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(done["payload"]["status"], "complete", "{done}");
    assert_eq!(done["source"], "naabum8");

    // The scan was of the enabled hostnames that resolve.
    let mut portfleet = s.db.connect().await;
    let mut scanned: Vec<String> = sqlx::query_scalar("SELECT unnest(string_to_array(hostname, ',')) FROM scan_hosts")
        .fetch_all(&mut portfleet)
        .await
        .unwrap();
    scanned.sort();
    assert_eq!(scanned, ["app.test", "closed.app.test", "ssh.app.test", "www.app.test"]);
    let products: HashMap<(String, i32), String> = sqlx::query_as::<_, (String, i32, String)>(
        "SELECT host(ip), port, service->>'product' || ' ' || (service->>'version') FROM results",
    )
    .fetch_all(&mut portfleet)
    .await
    .unwrap()
    .into_iter()
    .map(|(ip, port, p)| ((ip, port), p))
    .collect();
    let nginx = products[&(WEB.to_string(), 80)].clone();
    assert!(nginx.starts_with("nginx 1."), "{nginx}");
    let openssh = products[&(SSH.to_string(), 22)].clone();
    assert!(openssh.starts_with("OpenSSH 9."), "{openssh}");

    let mut conn = sqlx::PgConnection::connect(naabu.db.url()).await.unwrap();
    let mut services: Vec<(String, String, i32, String, bool, bool)> =
        sqlx::query_as::<_, (String, String, i32, String, bool, bool, Uuid)>(
            "SELECT ipaddress, protocol, port, service, tls, live, hostnameid FROM cptm8service",
        )
        .fetch_all(&mut conn)
        .await
        .unwrap()
        .into_iter()
        .map(|(ip, proto, port, service, tls, live, host)| {
            (naabu.name_of(host).to_string(), ip, port, format!("{proto}/{service}"), tls, live)
        })
        .collect();
    services.sort();
    let row = |host: &str, ip: &str, port, service: &str, tls, live| {
        (host.to_string(), ip.to_string(), port, format!("tcp/{service}"), tls, live)
    };
    assert_eq!(
        services,
        [
            row("app.test", WEB, 21, "ftp", false, false),
            row("app.test", WEB, 80, "http", false, true),
            row("app.test", WEB, 443, "http", false, true),
            row("closed.app.test", CLOSED, 80, "http", false, true),
            row("ssh.app.test", SSH, 22, "ssh", false, true),
            row("www.app.test", WEB, 80, "http", false, true),
            row("www.app.test", WEB, 443, "http", true, true),
        ]
    );
    let mut endpoints: Vec<(String, String, bool)> =
        sqlx::query_as::<_, (String, bool, Uuid)>("SELECT endpoint, live, hostnameid FROM cptm8endpoint")
            .fetch_all(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .map(|(url, live, host)| (url, naabu.name_of(host).to_string(), live))
            .collect();
    endpoints.sort();
    let ep = |url: &str, host: &str, live| (url.to_string(), host.to_string(), live);
    assert_eq!(
        endpoints,
        [
            ep("http://app.test", "app.test", true),
            ep("http://app.test:8080", "app.test", false),
            ep("http://closed.app.test", "closed.app.test", false),
            ep("http://www.app.test", "www.app.test", true),
            ep("https://app.test", "app.test", true),
            ep("https://www.app.test", "app.test", true),
        ]
    );
    let mut infos: Vec<(String, i32, Vec<String>)> = sqlx::query_as::<_, (Uuid, i32, String, Option<Vec<String>>)>(
        "SELECT hostnameid, port, protocol, software FROM cptm8hostnameinfo",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap()
    .into_iter()
    .map(|(host, port, proto, software)| {
        assert_eq!(proto, "tcp");
        (naabu.name_of(host).to_string(), port, software.unwrap_or_default())
    })
    .collect();
    infos.sort();
    let info = |host: &str, port, software: &str| (host.to_string(), port, vec![software.to_string()]);
    assert_eq!(
        infos,
        [
            info("app.test", 80, &nginx),
            info("app.test", 443, &nginx),
            info("ssh.app.test", 22, &openssh),
            info("www.app.test", 80, &nginx),
            info("www.app.test", 443, &nginx),
        ]
    );
}

/// The machine's own Postgres, RabbitMQ, MariaDB, Redis, Mosquitto and
/// NATS (which `scripts/test.sh` makes sure run), named over loopback by
/// the standalone `portfleet-agent scan -sV` - with the built-in rules and
/// with nmap's database - in naabu's JSON field names.
#[test]
fn the_machine_s_own_services_are_named_over_loopback() {
    let expected: [(u16, &str, &str); 6] = [
        (1883, "mqtt", ""),
        (3306, "mysql", "MariaDB"),
        (4222, "nats", "NATS server"),
        (5432, "postgresql", ""),
        (5672, "amqp", "RabbitMQ"),
        (6379, "redis", "Redis key-value store"),
    ];
    let ports: Vec<String> = expected.iter().map(|(p, _, _)| p.to_string()).collect();
    let nmap = Path::new("/usr/share/nmap/nmap-service-probes").exists();
    let ci = std::env::var("CI").as_deref() == Ok("true");
    assert!(nmap || !ci, "CI=true and nmap is not installed");
    for probes in ["none", "/usr/share/nmap/nmap-service-probes"].into_iter().take(if nmap { 2 } else { 1 }) {
        let out = Command::new(portfleet_tests::binary("portfleet-agent"))
            .args(["scan", "127.0.0.1", "--scan-type", "connect", "-sV", "--json", "--silent", "-p"])
            .arg(ports.join(","))
            .args(["--nmap-service-probes", probes])
            .output()
            .expect("portfleet-agent scan");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let lines: HashMap<u64, serde_json::Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("a JSON line"))
            .map(|v| (v["port"].as_u64().unwrap(), v))
            .collect();
        for (port, name, product) in expected {
            let Some(line) = lines.get(&u64::from(port)) else {
                assert!(!ci, "CI=true and nothing listens on 127.0.0.1:{port} (scripts/test.sh starts it)");
                eprintln!("skipping 127.0.0.1:{port}: nothing listens there");
                continue;
            };
            assert_eq!(line["name"], name, "{probes}: {line}");
            assert_eq!(line["tls"], false, "{line}");
            assert_eq!(line["verified"], true, "{line}");
            if !product.is_empty() && probes == "none" {
                // The built-in rules give product and version for these;
                // nmap's name some differently ("MySQL" for MariaDB).
                assert_eq!(line["product"], product, "{line}");
                assert!(
                    line["version"].as_str().is_some_and(|v| v.starts_with(|c: char| c.is_ascii_digit())),
                    "{line}"
                );
            }
        }
    }
}
