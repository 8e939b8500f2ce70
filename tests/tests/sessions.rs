//! Controller and agents as real processes: agents in a scanner namespace
//! scan listeners in a target namespace, the controller runs here against
//! a fresh database. Each scan must end with exactly the open set, each
//! result written once, whatever dies on the way.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use portfleet_proto::{
    auth::{ApiClient, Bearer},
    v1::{self as pb, watch_scan_response::Event},
};
use portfleet_tests::{
    TestDb,
    netns::{DEAD_V4, LIVE_V4, NetTopology, random_open_set},
    procs::{self, Proc, free_port},
};
use sqlx::Row;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

/// Short leases so failover is quick.
// The scope policy allows the target namespaces only.
const CTL_ARGS: &[&str] =
    &["--lease-ttl", "2s", "--heartbeat-interval", "500ms", "--allow", "198.18.0.0/15,2001:db8::/32"];

/// Fields drop in order: processes (printing their logs on failure)
/// before the log directory, the network and the database.
struct Setup {
    controllers: Vec<(Proc, String)>,
    agents: Vec<Proc>,
    _listeners: portfleet_tests::netns::Listeners,
    open: BTreeSet<SocketAddr>,
    topo: NetTopology,
    db: TestDb,
    logs: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Option<Self> {
        portfleet_tests::init_tracing();
        let topo = NetTopology::create_with_controller_link()?;
        let db = TestDb::create().await;
        let logs = tempfile::tempdir().unwrap();
        let mut ports = BTreeSet::new();
        while ports.len() < 6 {
            ports.insert(rand::random_range(1..=1000u16));
        }
        let open = random_open_set(30, false, &ports.into_iter().collect::<Vec<_>>());
        let listeners = topo.listen(&open.iter().copied().collect::<Vec<_>>());
        Some(Self { topo, db, logs, controllers: Vec::new(), agents: Vec::new(), open, _listeners: listeners })
    }

    fn controller_ip(&self) -> IpAddr {
        IpAddr::V4(self.topo.controller_ip.expect("management link"))
    }

    /// Starts a controller; returns its URL.
    fn start_controller(&mut self, name: &str, port: Option<u16>) -> String {
        let ip = self.controller_ip();
        let port = port.unwrap_or_else(|| free_port(ip));
        let url = format!("http://{ip}:{port}");
        let p = procs::controller(name, self.db.url(), &format!("{ip}:{port}"), CTL_ARGS, &self.logs);
        self.controllers.push((p, url.clone()));
        url
    }

    fn start_agent(&mut self, name: &str, controller_url: &str, extra: &[&str]) {
        let p = procs::agent(&self.topo, name, controller_url, extra, &self.logs);
        self.agents.push(p);
    }

    async fn client(&self, url: &str) -> ApiClient {
        self.client_trusting(url, None).await
    }

    /// A client of a controller serving TLS with a certificate `ca` signed.
    async fn client_trusting(&self, url: &str, ca: Option<&[u8]>) -> ApiClient {
        let url = url.to_string();
        let tls = ca.map(|ca| portfleet_proto::auth::client_tls(ca, None));
        let channel = portfleet_tests::eventually("the controller to answer", Duration::from_secs(30), || {
            let (url, tls) = (url.clone(), tls.clone());
            async move {
                let mut e = Channel::from_shared(url).ok()?;
                if let Some(t) = tls {
                    e = e.tls_config(t).ok()?;
                }
                e.connect().await.ok()
            }
        })
        .await;
        let token = self.db.token(portfleet_controller::auth::Scope::Admin).await;
        portfleet_proto::auth::client(channel, Bearer::new(&token).unwrap())
    }
}

fn scan_request(rate: u32, ports: &str) -> pb::CreateScanRequest {
    pb::CreateScanRequest {
        targets: vec![LIVE_V4.into()],
        ports: ports.into(),
        rate,
        scan_type: pb::ScanType::Syn as i32,
        ..Default::default()
    }
}

async fn wait_until(
    client: &mut ApiClient,
    id: &str,
    timeout: Duration,
    what: &str,
    f: impl Fn(&pb::Scan) -> bool,
) -> pb::Scan {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(scan) = client.get_scan(pb::GetScanRequest { id: id.into() }).await {
            let scan = scan.into_inner();
            if f(&scan) {
                return scan;
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}; scan is {scan:?}");
        } else {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn completed(client: &mut ApiClient, id: &str) -> pb::Scan {
    wait_until(client, id, Duration::from_secs(90), "completion", |s| {
        assert_ne!(s.state, pb::ScanState::Failed as i32, "scan failed: {}", s.error);
        s.state == pb::ScanState::Completed as i32
    })
    .await
}

async fn results(client: &mut ApiClient, id: &str) -> BTreeSet<SocketAddr> {
    let mut out = BTreeSet::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_results(pb::ListResultsRequest {
                scan_id: id.into(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        for r in page.results {
            let addr = SocketAddr::new(r.ip.parse().unwrap(), r.port as u16);
            assert!(out.insert(addr), "{addr} listed twice");
        }
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

#[track_caller]
fn assert_exact(found: &BTreeSet<SocketAddr>, open: &BTreeSet<SocketAddr>) {
    let missed: Vec<_> = open.difference(found).collect();
    let extra: Vec<_> = found.difference(open).collect();
    assert!(missed.is_empty() && extra.is_empty(), "missed {missed:?}, extra {extra:?}");
}

/// Rows per (ip, port): each result is written exactly once.
async fn assert_written_once(db: &TestDb, scan_id: &str, expected: usize) {
    let mut conn = db.connect().await;
    let row =
        sqlx::query("SELECT count(*) AS n, count(DISTINCT (ip, port)) AS d FROM results WHERE scan_id = $1::uuid")
            .bind(scan_id)
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(row.get::<i64, _>("n"), expected as i64);
    assert_eq!(row.get::<i64, _>("d"), expected as i64);
}

async fn agent_ids(client: &mut ApiClient) -> HashMap<String, String> {
    let agents = client.list_agents(pb::ListAgentsRequest::default()).await.unwrap().into_inner().agents;
    agents.into_iter().map(|a| (a.name, a.id)).collect()
}

/// No shard was ever leased to two holders at once: per shard, each lease
/// ended before the next began.
async fn assert_no_overlapping_leases(db: &TestDb, scan_id: &str) -> Vec<(i64, i64, String, String, i64)> {
    let mut conn = db.connect().await;
    let rows = sqlx::query(
        "SELECT l.shard_id, l.lease_epoch, l.agent_id::text AS agent, l.controller_id, l.start_index,
                l.leased_at, l.ended_at
         FROM shard_leases l JOIN shards s ON s.id = l.shard_id
         WHERE s.scan_id = $1::uuid ORDER BY l.shard_id, l.lease_epoch",
    )
    .bind(scan_id)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    let mut prev: Option<(i64, Option<chrono::DateTime<chrono::Utc>>)> = None;
    let mut out = Vec::new();
    for r in &rows {
        let shard: i64 = r.get("shard_id");
        let leased: chrono::DateTime<chrono::Utc> = r.get("leased_at");
        let ended: Option<chrono::DateTime<chrono::Utc>> = r.get("ended_at");
        if let Some((p_shard, p_end)) = prev
            && p_shard == shard
        {
            let p_end = p_end.unwrap_or_else(|| panic!("shard {shard}: a lease never ended before the next began"));
            assert!(p_end <= leased, "shard {shard}: leases overlap ({p_end} > {leased})");
        }
        prev = Some((shard, ended));
        out.push((shard, r.get("lease_epoch"), r.get("agent"), r.get("controller_id"), r.get("start_index")));
    }
    out
}

/// Waits for `agent` to hold a lease whose checkpoint is past its start but
/// not at its end, and returns the shard.
async fn mid_shard_lease(db: &TestDb, agent: &str) -> i64 {
    let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
    let agent = agent.to_string();
    portfleet_tests::eventually("a checkpoint in the middle of a shard", Duration::from_secs(60), || {
        let (pool, agent) = (pool.clone(), agent.clone());
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT id FROM shards WHERE agent_id = $1::uuid AND state = 'leased'
                   AND checkpoint > start_index AND checkpoint < end_index LIMIT 1",
            )
            .bind(agent)
            .fetch_optional(&pool)
            .await
            .ok()
            .flatten()
        }
    })
    .await
}

#[tokio::test]
async fn two_agents_scan_a_slash_24_exactly_and_watch_sees_it_all() {
    let Some(mut s) = Setup::new().await else { return };
    let url = s.start_controller("controller", None);
    s.start_agent("agent-a", &url, &[]);
    s.start_agent("agent-b", &url, &[]);
    let mut client = s.client(&url).await;
    portfleet_tests::eventually("both agents connected", Duration::from_secs(30), || {
        let mut c = client.clone();
        async move { (agent_ids(&mut c).await.len() == 2).then_some(()) }
    })
    .await;
    let scan = client.create_scan(scan_request(60_000, "1-1000")).await.unwrap().into_inner();
    let mut watch = client.watch_scan(pb::WatchScanRequest { id: scan.id.clone() }).await.unwrap().into_inner();
    let watched = tokio::spawn(async move {
        let mut seen = BTreeSet::new();
        let mut last_state = 0;
        while let Some(Ok(event)) = watch.next().await {
            match event.event {
                Some(Event::Results(r)) => {
                    for r in r.results {
                        seen.insert(SocketAddr::new(r.ip.parse().unwrap(), r.port as u16));
                    }
                }
                Some(Event::Scan(s)) => last_state = s.state,
                None => {}
            }
        }
        (seen, last_state)
    });
    let done = completed(&mut client, &scan.id).await;
    assert_eq!(done.probes_done, done.probes_planned);
    assert_eq!(done.open_ports as usize, s.open.len());
    let found = results(&mut client, &scan.id).await;
    assert_exact(&found, &s.open);
    assert_written_once(&s.db, &scan.id, s.open.len()).await;
    let leases = assert_no_overlapping_leases(&s.db, &scan.id).await;
    let agents: BTreeSet<&String> = leases.iter().map(|l| &l.2).collect();
    assert_eq!(agents.len(), 2, "both agents worked on the scan");
    let (seen, last_state) = tokio::time::timeout(Duration::from_secs(10), watched).await.unwrap().unwrap();
    assert_exact(&seen, &s.open);
    assert_eq!(last_state, pb::ScanState::Completed as i32);
    let listed = client.list_agents(pb::ListAgentsRequest::default()).await.unwrap().into_inner().agents;
    assert!(
        listed
            .iter()
            .all(|a| a.state == pb::AgentState::Connected as i32 && a.raw_socket && !a.controller_id.is_empty())
    );
}

#[tokio::test]
async fn a_killed_agent_s_shard_resumes_from_its_checkpoint() {
    let Some(mut s) = Setup::new().await else { return };
    let url = s.start_controller("controller", None);
    s.start_agent("victim", &url, &["--max-shards", "1"]);
    s.start_agent("survivor", &url, &["--max-shards", "1"]);
    let mut client = s.client(&url).await;
    let ids = portfleet_tests::eventually("both agents connected", Duration::from_secs(30), || {
        let mut c = client.clone();
        async move { Some(agent_ids(&mut c).await).filter(|m| m.len() == 2) }
    })
    .await;
    let victim = ids["victim"].clone();
    // Slow enough that a shard takes seconds.
    let scan = client.create_scan(scan_request(20_000, "1-1000")).await.unwrap().into_inner();
    let shard = mid_shard_lease(&s.db, &victim).await;
    let mut conn = s.db.connect().await;
    let victim_proc = s.agents.iter_mut().find(|p| p.name == "victim").unwrap();
    victim_proc.kill9();
    let done = completed(&mut client, &scan.id).await;
    assert_eq!(done.probes_done, done.probes_planned);
    assert_exact(&results(&mut client, &scan.id).await, &s.open);
    assert_written_once(&s.db, &scan.id, s.open.len()).await;
    let leases = assert_no_overlapping_leases(&s.db, &scan.id).await;
    let start: i64 = sqlx::query_scalar("SELECT start_index FROM shards WHERE id = $1")
        .bind(shard)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    let of_shard: Vec<_> = leases.iter().filter(|l| l.0 == shard).collect();
    assert!(of_shard.len() >= 2, "the victim's shard was leased again: {of_shard:?}");
    let resumed = of_shard.last().unwrap();
    assert!(resumed.4 > start, "the shard resumed from its checkpoint {}, not from its start {start}", resumed.4);
    assert_ne!(resumed.2, victim);
}

#[tokio::test]
async fn a_controller_restart_midway_loses_and_doubles_nothing() {
    let Some(mut s) = Setup::new().await else { return };
    let ip = s.controller_ip();
    let port = free_port(ip);
    let url = s.start_controller("controller", Some(port));
    s.start_agent("agent-a", &url, &[]);
    s.start_agent("agent-b", &url, &[]);
    let mut client = s.client(&url).await;
    let scan = client.create_scan(scan_request(20_000, "1-1000")).await.unwrap().into_inner();
    wait_until(&mut client, &scan.id, Duration::from_secs(30), "progress", |s| s.probes_done > 0).await;
    s.controllers[0].0.kill9();
    let url2 = s.start_controller("controller-restarted", Some(port));
    assert_eq!(url, url2);
    let mut client = s.client(&url).await;
    completed(&mut client, &scan.id).await;
    assert_exact(&results(&mut client, &scan.id).await, &s.open);
    assert_written_once(&s.db, &scan.id, s.open.len()).await;
    assert_no_overlapping_leases(&s.db, &scan.id).await;
}

#[tokio::test]
async fn two_controllers_share_one_database_without_double_leases() {
    let Some(mut s) = Setup::new().await else { return };
    let url_a = s.start_controller("controller-a", None);
    let url_b = s.start_controller("controller-b", None);
    s.start_agent("agent-a", &url_a, &[]);
    s.start_agent("agent-b", &url_b, &[]);
    let mut client = s.client(&url_a).await;
    portfleet_tests::eventually("both agents connected", Duration::from_secs(30), || {
        let mut c = client.clone();
        async move { (agent_ids(&mut c).await.len() == 2).then_some(()) }
    })
    .await;
    let scan = client.create_scan(scan_request(40_000, "1-1000")).await.unwrap().into_inner();
    completed(&mut client, &scan.id).await;
    let mut client_b = s.client(&url_b).await;
    assert_exact(&results(&mut client_b, &scan.id).await, &s.open);
    assert_written_once(&s.db, &scan.id, s.open.len()).await;
    let leases = assert_no_overlapping_leases(&s.db, &scan.id).await;
    let controllers: BTreeSet<&String> = leases.iter().map(|l| &l.3).collect();
    assert_eq!(controllers.len(), 2, "both controllers leased shards: {controllers:?}");
}

#[tokio::test]
async fn cancel_mid_scan_stops_probing_within_a_second() {
    let Some(mut s) = Setup::new().await else { return };
    let url = s.start_controller("controller", None);
    s.start_agent("agent-a", &url, &[]);
    s.start_agent("agent-b", &url, &[]);
    let mut client = s.client(&url).await;
    let scan = client.create_scan(scan_request(20_000, "full")).await.unwrap().into_inner();
    let before = s.topo.target_out_rsts();
    portfleet_tests::eventually("probes arriving", Duration::from_secs(30), || {
        let n = s.topo.target_out_rsts();
        async move { (n > before + 10_000).then_some(()) }
    })
    .await;
    let cancelled = client.cancel_scan(pb::CancelScanRequest { id: scan.id.clone() }).await.unwrap().into_inner();
    assert_eq!(cancelled.state, pb::ScanState::Cancelled as i32);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let at_one_second = s.topo.target_out_rsts();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(s.topo.target_out_rsts(), at_one_second, "SYNs still arrived more than 1 s after the cancel");
    let scan = client.get_scan(pb::GetScanRequest { id: scan.id.clone() }).await.unwrap().into_inner();
    assert_eq!(scan.state, pb::ScanState::Cancelled as i32);
}

#[tokio::test]
async fn sigterm_hands_the_shard_back_and_another_agent_finishes_it() {
    let Some(mut s) = Setup::new().await else { return };
    let url = s.start_controller("controller", None);
    s.start_agent("leaver", &url, &["--max-shards", "1"]);
    let mut client = s.client(&url).await;
    let ids = portfleet_tests::eventually("the agent connected", Duration::from_secs(30), || {
        let mut c = client.clone();
        async move { Some(agent_ids(&mut c).await).filter(|m| m.len() == 1) }
    })
    .await;
    let scan = client.create_scan(scan_request(20_000, "1-1000")).await.unwrap().into_inner();
    let shard = mid_shard_lease(&s.db, &ids["leaver"]).await;
    let mut conn = s.db.connect().await;
    let status = s.agents[0].terminate(Duration::from_secs(15)).expect("the agent exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    let (outcome, released_at): (Option<String>, i64) = sqlx::query_as(
        "SELECT l.outcome, s.checkpoint FROM shard_leases l JOIN shards s ON s.id = l.shard_id
         WHERE l.shard_id = $1 ORDER BY l.lease_epoch DESC LIMIT 1",
    )
    .bind(shard)
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(outcome.as_deref(), Some("released"));
    s.start_agent("finisher", &url, &[]);
    completed(&mut client, &scan.id).await;
    assert_exact(&results(&mut client, &scan.id).await, &s.open);
    assert_written_once(&s.db, &scan.id, s.open.len()).await;
    let leases = assert_no_overlapping_leases(&s.db, &scan.id).await;
    let next = leases.iter().rfind(|l| l.0 == shard).unwrap();
    assert_eq!(next.4, released_at, "the shard resumed where the leaver handed it back");
}

#[tokio::test]
async fn connect_only_agents_say_so_for_syn_scans_and_run_them_when_allowed() {
    let Some(mut s) = Setup::new().await else { return };
    let url = s.start_controller("controller", None);
    // An agent without CAP_NET_RAW: run it as nobody.
    let state = s.logs.path().join("nobody");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::set_permissions(&state, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let mut cmd = s.topo.in_scanner("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"])
        .arg(portfleet_tests::binary("portfleet-agent"))
        .args(["run", "--controller", &url, "--name", "unprivileged", "--state-dir"])
        .arg(&state);
    let log = std::fs::File::create(s.logs.path().join("unprivileged.log")).unwrap();
    let mut child = cmd.stderr(log).spawn().unwrap();
    let mut client = s.client(&url).await;
    let syn = client.create_scan(scan_request(20_000, "1-1000")).await.unwrap().into_inner();
    let waiting =
        wait_until(&mut client, &syn.id, Duration::from_secs(30), "a waiting reason", |s| !s.waiting_reason.is_empty())
            .await;
    assert_eq!(waiting.state, pb::ScanState::Pending as i32);
    assert!(waiting.waiting_reason.contains("connect-only"), "{}", waiting.waiting_reason);
    client.cancel_scan(pb::CancelScanRequest { id: syn.id }).await.unwrap();

    let mut allowed = scan_request(20_000, "1-1000");
    allowed.allow_connect_fallback = true;
    let scan = client.create_scan(allowed).await.unwrap().into_inner();
    completed(&mut client, &scan.id).await;
    assert_exact(&results(&mut client, &scan.id).await, &s.open);
    let _ = child.kill();
    let _ = child.wait();
}

/// A controller whose policy is looser than an agent's own (the controller
/// allows 198.18.0.0/15, the agent only the dead block): the agent refuses
/// every assignment, the scan fails saying why, and not one probe reaches
/// the target namespace.
#[tokio::test]
async fn an_agent_refuses_work_outside_its_own_scope_and_sends_nothing() {
    let Some(mut s) = Setup::new().await else { return };
    let url = s.start_controller("controller", None);
    s.start_agent("narrow", &url, &["--allow", DEAD_V4]);
    let mut client = s.client(&url).await;
    let rsts = s.topo.target_out_rsts();
    let rx = s.topo.target_rx_packets();
    let scan = client.create_scan(scan_request(20_000, "1-1000")).await.unwrap().into_inner();
    let failed = wait_until(&mut client, &scan.id, Duration::from_secs(60), "the scan to fail", |s| {
        s.state == pb::ScanState::Failed as i32
    })
    .await;
    // At once, naming the agent and its reason: not after four leases.
    assert!(failed.error.starts_with("agent narrow refused shard "), "{}", failed.error);
    assert!(failed.error.contains("by its own scope policy") && failed.error.contains("--allow"), "{}", failed.error);
    let refusals: i64 = sqlx::query_scalar("SELECT count(*) FROM shard_leases WHERE outcome = 'failed'")
        .fetch_one(&mut s.db.connect().await)
        .await
        .unwrap();
    assert_eq!(refusals, 1, "the refused shard was leased again");
    assert_eq!(failed.probes_done, 0);
    // 30 hosts x 1000 ports would have drawn ~30,000 RSTs.
    assert_eq!(s.topo.target_out_rsts(), rsts, "the target answered probes");
    let stray = s.topo.target_rx_packets() - rx;
    assert!(stray < 10, "{stray} packets reached the target (neighbour discovery at most)");
}

/// The whole mTLS path with the real binaries: `ca init`, a controller
/// serving TLS and enrolling agents, `agents enroll-token`, `portfleet-agent
/// enroll` from the scanner namespace, then `run` with the stored identity
/// scanning a namespace target over mTLS - exactly.
#[tokio::test]
async fn an_enrolled_agent_scans_end_to_end_over_mtls() {
    let Some(mut s) = Setup::new().await else { return };
    let ip = s.controller_ip();
    let port = free_port(ip);
    let tls = s.logs.path().join("tls");
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(portfleet_tests::binary("portfleet-controller"))
            .args(args)
            .env_remove("DATABASE_URL")
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    let dir = tls.to_str().unwrap().to_string();
    ctl(&["ca", "init", "--dir", &dir, "--server-name", &ip.to_string()]);
    let file = |name: &str| format!("{dir}/{name}");
    let (cert, key, ca, ca_key) = (file("server.pem"), file("server.key"), file("ca.pem"), file("ca.key"));
    let mut args: Vec<&str> = CTL_ARGS.to_vec();
    args.extend(["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca, "--tls-client-ca-key", &ca_key]);
    let url = format!("https://{ip}:{port}");
    let p = procs::controller("controller", s.db.url(), &format!("{ip}:{port}"), &args, &s.logs);
    s.controllers.push((p, url.clone()));
    let ca_pem = std::fs::read(&ca).unwrap();
    let mut client = s.client_trusting(&url, Some(&ca_pem)).await;
    let token = ctl(&["agents", "--database-url", s.db.url(), "enroll-token", "--labels", "site=lab"]);
    let out = s
        .topo
        .in_scanner(portfleet_tests::binary("portfleet-agent"))
        .args(["enroll", "--controller", &url, "--token", &token, "--name", "mtls", "--ca", &ca, "--state-dir"])
        .arg(s.logs.path().join("state"))
        .output()
        .unwrap();
    assert!(out.status.success(), "enroll: {}", String::from_utf8_lossy(&out.stderr));
    // `run` finds the enrolled key, certificate and CA in its state dir.
    s.start_agent("mtls", &url, &[]);
    let scan = client.create_scan(scan_request(20_000, "1-1000")).await.unwrap().into_inner();
    completed(&mut client, &scan.id).await;
    assert_exact(&results(&mut client, &scan.id).await, &s.open);
    let agents = client.list_agents(pb::ListAgentsRequest::default()).await.unwrap().into_inner().agents;
    let a = agents.iter().find(|a| a.name == "mtls").expect("the enrolled agent");
    assert_eq!(a.labels.get("site").map(String::as_str), Some("lab"), "the token's labels");
}

/// The highest rate over any window of at least a second between samples,
/// and when that window began.
fn peak_rate(samples: &[(std::time::Instant, u64)]) -> (f64, std::time::Instant) {
    let mut peak = (0.0f64, samples[0].0);
    for (i, &(t0, c0)) in samples.iter().enumerate() {
        if let Some(&(t1, c1)) = samples[i..].iter().find(|(t, _)| t.duration_since(t0) >= Duration::from_secs(1)) {
            let rate = (c1 - c0) as f64 / t1.duration_since(t0).as_secs_f64();
            if rate > peak.0 {
                peak = (rate, t0);
            }
        }
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_scans_of_one_slash_24_never_exceed_the_per_block_cap_together() {
    const CAP: u32 = 1000;
    let Some(mut s) = Setup::new().await else { return };
    // Two controllers and one agent on each, one shard at a time: the two
    // scans run on different agents of different controllers.
    let url_a = s.start_controller("controller-a", None);
    let url_b = s.start_controller("controller-b", None);
    s.start_agent("agent-a", &url_a, &["--max-shards", "1"]);
    s.start_agent("agent-b", &url_b, &["--max-shards", "1"]);
    let mut client = s.client(&url_a).await;
    portfleet_tests::eventually("both agents connected", Duration::from_secs(30), || {
        let mut c = client.clone();
        async move { (agent_ids(&mut c).await.len() == 2).then_some(()) }
    })
    .await;
    let policy = client
        .update_scope_policy(pb::UpdateScopePolicyRequest { max_rate_per_block: Some(CAP), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .policy
        .unwrap();
    assert_eq!((policy.max_rate_per_block, policy.max_rate_per_host), (CAP, 0));

    let sampler = s.topo.sample_target_rx(Duration::from_millis(50));
    // Each scan alone asks for five times the cap.
    let first = client.create_scan(scan_request(5 * CAP, "1-16")).await.unwrap().into_inner();
    wait_until(&mut client, &first.id, Duration::from_secs(30), "the first scan probing", |s| s.probes_done > 0).await;
    let second_at = std::time::Instant::now();
    let second = client.create_scan(scan_request(5 * CAP, "1-16")).await.unwrap().into_inner();
    let second = completed(&mut client, &second.id).await;
    let first = completed(&mut client, &first.id).await;
    let samples = sampler.finish();

    let at = |t: &Option<prost_types::Timestamp>| t.map(|t| (t.seconds, t.nanos)).expect("a timestamp");
    assert!(at(&second.start_time) < at(&first.end_time), "the scans ran at the same time: {first:?} {second:?}");
    let holders = |leases: Vec<(i64, i64, String, String, i64)>| -> BTreeSet<String> {
        leases.into_iter().map(|l| l.3).collect()
    };
    let (ca, cb) = (
        holders(assert_no_overlapping_leases(&s.db, &first.id).await),
        holders(assert_no_overlapping_leases(&s.db, &second.id).await),
    );
    assert!(ca.len() == 1 && cb.len() == 1 && ca != cb, "each scan on its own controller: {ca:?} {cb:?}");
    let probes = first.probes_planned + second.probes_planned;
    let (t0, c0) = samples[0];
    let (t1, c1) = *samples.last().unwrap();
    let (peak, peak_at) = peak_rate(&samples);
    let since = |t: std::time::Instant| t.duration_since(t0).as_secs_f64();
    eprintln!(
        "politeness: {probes} probes, {} packets in {:.1} s at the target; peak {peak:.0}/s over 1 s windows \
         (cap {CAP}) from {:.2} s; second scan created at {:.2} s",
        c1 - c0,
        since(t1),
        since(peak_at),
        since(second_at)
    );
    assert!(c1 - c0 >= probes, "every probe reached the target");
    // 5% for timer jitter and the agents' token buckets.
    assert!(peak <= f64::from(CAP) * 1.05, "the /24 got {peak:.0} probes/s, over the cap of {CAP}");
    assert!(peak >= f64::from(CAP) * 0.5, "the scans ran near the cap, not far below it: {peak:.0}/s");
    for agent in &s.agents {
        assert!(!agent.log().contains("holding probes"), "an agent held its probes with its controller up");
    }
}

#[tokio::test]
async fn an_agent_holds_its_probes_while_the_controller_is_silent() {
    let Some(mut s) = Setup::new().await else { return };
    let url = s.start_controller("controller", None);
    s.start_agent("agent-a", &url, &[]);
    let mut client = s.client(&url).await;
    // Slow enough that the outbox (64 unacked frames) would not fill and
    // pause the engine for many seconds: only the hold stops it in time.
    let scan = client.create_scan(scan_request(2_000, "1-100")).await.unwrap().into_inner();
    let open: BTreeSet<SocketAddr> = s.open.iter().filter(|a| a.port() <= 100).copied().collect();
    let before = s.topo.target_out_rsts();
    portfleet_tests::eventually("probes arriving", Duration::from_secs(30), || {
        let n = s.topo.target_out_rsts();
        async move { (n > before + 1_000).then_some(()) }
    })
    .await;
    // Frozen: its sockets stay open, nothing answers. With a 2 s lease TTL
    // the agent holds after 1.5 s of silence.
    s.controllers[0].0.set_running(false);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let held = s.topo.target_out_rsts();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still = s.topo.target_out_rsts();
    s.controllers[0].0.set_running(true);
    assert_eq!(still, held, "probes went out while the controller was silent past the lease TTL");
    assert!(s.agents[0].log().contains("holding probes"), "the agent held (not merely backpressure)");
    // Its leases lapsed meanwhile: they are dropped and the work resumes
    // from their checkpoints, nothing lost or doubled.
    completed(&mut client, &scan.id).await;
    assert_exact(&results(&mut client, &scan.id).await, &open);
    assert_written_once(&s.db, &scan.id, open.len()).await;
    assert_no_overlapping_leases(&s.db, &scan.id).await;
}

/// A controller binary on loopback for the daemon tests below, whose agents
/// run on this host and are never given a scan: no namespace needed.
fn loopback_controller(name: &str, db: &TestDb, port: u16, logs: &tempfile::TempDir) -> (Proc, String) {
    let listen = format!("127.0.0.1:{port}");
    (procs::controller(name, db.url(), &listen, CTL_ARGS, logs), format!("http://{listen}"))
}

fn sessions_of(agent: &Proc) -> usize {
    agent.log().matches("session established").count()
}

/// Two daemons with one name would share one agent id and knock each
/// other's session off the controller forever: the second refuses to
/// start, naming the first; a crashed agent's lock does not linger.
#[tokio::test]
async fn a_second_agent_with_the_same_name_refuses_to_start_and_the_first_keeps_its_session() {
    portfleet_tests::init_tracing();
    let db = TestDb::create().await;
    let logs = tempfile::tempdir().unwrap();
    let (_controller, url) = loopback_controller("controller", &db, free_port([127, 0, 0, 1].into()), &logs);
    let mut first = procs::host_agent("first", "scanner-1", &url, &[], &logs);
    procs::wait_for("the first agent's session", Duration::from_secs(30), || (sessions_of(&first) == 1).then_some(()));

    let mut second = procs::host_agent("second", "scanner-1", &url, &[], &logs);
    let status = second.wait_exit(Duration::from_secs(10)).expect("the second agent exits at once");
    assert!(!status.success(), "{status:?}");
    let expected = format!("agent scanner-1 is already running, pid {}", first.pid());
    assert!(second.log().contains(&expected), "{:?}", second.log());
    assert!(first.is_running());
    assert_eq!(sessions_of(&first), 1, "the first agent's session was disturbed:\n{}", first.log());

    // Killed (no cleanup at all): the next agent of that name starts.
    first.kill9();
    let third = procs::host_agent("third", "scanner-1", &url, &[], &logs);
    procs::wait_for("the next agent's session", Duration::from_secs(30), || (sessions_of(&third) == 1).then_some(()));
}

/// An agent rejoins within a few seconds of its controller's return, however
/// long the outage (it came back 21 s late after 34 s with a 30 s backoff
/// cap), and says once that the controller is away, with the cause.
#[tokio::test]
async fn an_agent_rejoins_within_seconds_of_its_controller_s_return() {
    /// The agent's reconnect cap, and slack for a busy machine.
    const CAP: Duration = Duration::from_secs(5);
    const SLACK: Duration = Duration::from_secs(5);
    portfleet_tests::init_tracing();
    let db = TestDb::create().await;
    let logs = tempfile::tempdir().unwrap();
    let port = free_port([127, 0, 0, 1].into());
    let (mut controller, url) = loopback_controller("controller", &db, port, &logs);
    let agent = procs::host_agent("agent", "agent-a", &url, &[], &logs);
    procs::wait_for("the agent's session", Duration::from_secs(30), || (sessions_of(&agent) == 1).then_some(()));

    controller.kill9();
    procs::wait_for("the agent missing its controller", Duration::from_secs(10), || {
        agent.log().contains("cannot reach the controller").then_some(())
    });
    // The outage itself: long enough for a 30 s cap to have grown past it.
    tokio::time::sleep(Duration::from_secs(25)).await;
    let (_controller, _) = loopback_controller("controller-back", &db, port, &logs);
    portfleet_tests::eventually("the controller back", Duration::from_secs(30), || {
        let url = url.clone();
        async move { Channel::from_shared(url).ok()?.connect().await.ok() }
    })
    .await;
    let back = std::time::Instant::now();
    procs::wait_for("the agent back", CAP + SLACK + Duration::from_secs(10), || {
        (sessions_of(&agent) == 2).then_some(())
    });
    let late = back.elapsed();
    assert!(late <= CAP + SLACK, "the agent rejoined {late:?} after its controller's return");

    let log = agent.log();
    let away: Vec<&str> = log.lines().filter(|l| l.contains("cannot reach the controller")).collect();
    assert_eq!(away.len(), 1, "one line for the outage, not one per retry:\n{log}");
    assert!(away[0].contains("Connection refused") || away[0].contains("connection refused"), "{}", away[0]);
    assert!(!log.contains("holding probes"), "an idle agent has no probes to hold:\n{log}");
}

/// Two processes with one agent id (a state directory copied to another
/// host): the controller refuses the second session while the first lives.
/// The refused agent says so once at WARN, with the controller's message,
/// and retries on its capped backoff, not in a spin; the first keeps its
/// session.
#[tokio::test]
async fn an_agent_refused_for_a_live_twin_says_so_once_and_retries_at_its_pace() {
    portfleet_tests::init_tracing();
    let db = TestDb::create().await;
    let logs = tempfile::tempdir().unwrap();
    let (controller, url) = loopback_controller("controller", &db, free_port([127, 0, 0, 1].into()), &logs);
    let first = procs::host_agent("first", "twin", &url, &[], &logs);
    procs::wait_for("the first agent's session", Duration::from_secs(30), || (sessions_of(&first) == 1).then_some(()));
    let twin_state = logs.path().join("twin-state");
    std::fs::create_dir_all(&twin_state).unwrap();
    std::fs::copy(logs.path().join("state/agent-twin.id"), twin_state.join("agent-twin.id")).unwrap();
    let mut cmd = std::process::Command::new(portfleet_tests::binary("portfleet-agent"));
    cmd.args(["run", "--controller", &url, "--name", "twin", "--state-dir"]).arg(&twin_state);
    let twin = Proc::spawn_command("twin", cmd, &logs);
    procs::wait_for("the twin refused", Duration::from_secs(30), || {
        twin.log().contains("session refused by the controller").then_some(())
    });
    // A while of retrying: a few attempts on the backoff, 5 s apart at most.
    let started = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(12)).await;
    let window = started.elapsed();

    let log = twin.log();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("session refused by the controller")).collect();
    assert_eq!(refused.len(), 1, "one line for a refusal that repeats, not one per retry:\n{log}");
    assert!(refused[0].contains(" WARN ") && refused[0].contains("code=AlreadyExists"), "{}", refused[0]);
    assert!(refused[0].contains("already has a live session"), "the controller's message: {}", refused[0]);
    assert_eq!(sessions_of(&twin), 0, "{log}");
    assert_eq!(sessions_of(&first), 1, "the first agent's session was disturbed:\n{}", first.log());
    let attempts = controller.log().matches("second session of a live agent refused").count();
    // 100 ms doubling to 5 s: about eight attempts in 12 s; a spin makes thousands.
    assert!((2..=20).contains(&attempts), "{attempts} attempts in {window:?}");
}
