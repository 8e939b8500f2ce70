//! Metrics and HTTP health end to end: Debian's real Prometheus server
//! scrapes a controller and an agent while the agent scans targets in a
//! namespace, and the test reads the figures back through Prometheus's
//! HTTP API; `/readyz` follows a private Postgres that the test stops and
//! starts, and an AMQP ingress that cannot connect.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::Duration,
};

use portfleet_proto::v1 as pb;
use portfleet_tests::{
    TestDb, eventually, http_get as get,
    netns::NetTopology,
    pgcluster::PgCluster,
    procs::{self, Proc, free_port},
};
use tonic::transport::Channel;

/// Percent-encodes a PromQL query for a URL.
fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The single value of an instant query, when it has exactly one series.
async fn query(prometheus: SocketAddr, q: &str) -> Option<f64> {
    let (status, body) = get(prometheus, &format!("/api/v1/query?query={}", encode(q))).await?;
    if status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let result = v["data"]["result"].as_array()?;
    if result.len() != 1 {
        return None;
    }
    result[0]["value"][1].as_str()?.parse().ok()
}

/// Debian's Prometheus server scraping `targets` every second, with its
/// data in a temporary directory.
struct Prometheus {
    _proc: Proc,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[(&str, SocketAddr)], logs: &tempfile::TempDir) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut config = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n");
        for (job, addr) in targets {
            config.push_str(&format!("  - job_name: {job}\n    static_configs:\n      - targets: ['{addr}']\n"));
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let addr = SocketAddr::new(ip, free_port(ip));
        let binary = ["/usr/bin/prometheus", "/usr/sbin/prometheus"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("Debian's prometheus package (scripts/test.sh installs it)");
        let mut cmd = Command::new(binary);
        cmd.arg(format!("--config.file={}", file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"));
        Self { _proc: Proc::spawn_command("prometheus", cmd, logs), addr, _dir: dir }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_figures_of_a_scan() {
    portfleet_tests::init_tracing();
    let Some(topo) = NetTopology::create_with_controller_link() else { return };
    let db = TestDb::create().await;
    let logs = tempfile::tempdir().unwrap();
    let root_ip = topo.controller_ip.expect("management link");
    // The scanner's end of the management link: the agent's metrics are
    // served there, reachable from this namespace.
    let agent_ip = std::net::Ipv4Addr::from(u32::from(root_ip) + 1);
    let ip = IpAddr::V4(root_ip);
    let listen = format!("{ip}:{}", free_port(ip));
    let ctl_metrics = SocketAddr::new(ip, free_port(ip));
    let agent_metrics = SocketAddr::new(IpAddr::V4(agent_ip), 19465);
    let ctl_metrics_flag = ctl_metrics.to_string();
    let _controller = procs::controller(
        "controller",
        db.url(),
        &listen,
        &["--allow", "198.18.0.0/15", "--metrics-listen", &ctl_metrics_flag],
        &logs,
    );
    let agent_metrics_flag = agent_metrics.to_string();
    let url = format!("http://{listen}");
    let _agent = procs::agent(&topo, "metrics-agent", &url, &["--metrics-listen", &agent_metrics_flag], &logs);
    let prometheus = Prometheus::start(&[("controller", ctl_metrics), ("agent", agent_metrics)], &logs);

    // Seven open ports on two hosts; the scan covers 2 x 100 positions.
    let open: Vec<SocketAddr> = [
        "198.18.1.10:22",
        "198.18.1.10:80",
        "198.18.1.10:443",
        "198.18.1.11:25",
        "198.18.1.11:53",
        "198.18.1.11:8080",
        "198.18.1.11:8443",
    ]
    .iter()
    .map(|s| s.parse().unwrap())
    .collect();
    let _listeners = topo.listen(&open);
    let token = db.token(portfleet_controller::auth::Scope::Scan).await;
    let channel = eventually("the controller to answer", Duration::from_secs(30), || {
        let url = url.clone();
        async move { Channel::from_shared(url).ok()?.connect().await.ok() }
    })
    .await;
    let mut api = portfleet_proto::auth::client(channel, portfleet_proto::auth::Bearer::new(&token).unwrap());
    // A refused call is counted under its code (a trailers-only response).
    let bad =
        pb::CreateScanRequest { targets: vec!["198.18.1.10".into()], ports: "99999".into(), ..Default::default() };
    assert_eq!(api.create_scan(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let mut ports: Vec<String> = (20..80).map(|p| p.to_string()).collect();
    ports.extend(["80", "443", "8080", "8443"].map(String::from));
    ports.extend((1000..1036).map(|p| p.to_string()));
    let scan = api
        .create_scan(pb::CreateScanRequest {
            targets: vec!["198.18.1.10-198.18.1.11".into()],
            ports: ports.join(","),
            rate: 2000,
            identify: Some(false),
            ..Default::default()
        })
        .await
        .expect("create scan")
        .into_inner();
    let done = eventually("the scan to complete", Duration::from_secs(90), || {
        let (mut api, id) = (api.clone(), scan.id.clone());
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (s.state == pb::ScanState::Completed as i32).then_some(s)
        }
    })
    .await;
    assert_eq!(done.open_ports, open.len() as u64, "the scan found every open port");

    // Read back through Prometheus: what it scraped, not what we render.
    let p = prometheus.addr;
    let want = open.len() as f64;
    let check = async |what: &str, q: &str, want: f64| {
        eventually(what, Duration::from_secs(60), || async move { (query(p, q).await == Some(want)).then_some(()) })
            .await
    };
    check("results ingested = open ports", "portfleet_results_ingested_total{job=\"controller\"}", want).await;
    check("agents connected = 1", "portfleet_agents_connected{job=\"controller\"}", 1.0).await;
    check("the agent's session", "portfleet_agent_connected{job=\"agent\"}", 1.0).await;
    check("the agent's open ports", "portfleet_agent_open_ports_total{job=\"agent\"}", want).await;
    // Two hosts x 100 ports, each probed once at least.
    let sent = eventually("the agent's probe count", Duration::from_secs(60), || async move {
        query(p, "portfleet_agent_probes_sent_total{job=\"agent\"}").await.filter(|&n| n >= 200.0)
    })
    .await;
    assert!(sent < 1000.0, "{sent} probes for 200 positions");
    check(
        "one CreateScan, OK",
        "portfleet_grpc_requests_total{job=\"controller\",method=\"CreateScan\",code=\"OK\"}",
        1.0,
    )
    .await;
    check(
        "one CreateScan, InvalidArgument",
        "portfleet_grpc_requests_total{job=\"controller\",method=\"CreateScan\",code=\"InvalidArgument\"}",
        1.0,
    )
    .await;
    check("the scan counted as completed", "portfleet_scans_finished_total{state=\"completed\"}", 1.0).await;
    // The fleet-wide gauges are read from Postgres: one agent connected
    // (only the sampler can say so), and no scan left running.
    check("one agent connected, fleet-wide", "portfleet_agents{job=\"controller\",state=\"connected\"}", 1.0).await;
    check("no unfinished scans", "portfleet_scans{job=\"controller\",state=\"running\"}", 0.0).await;
    // Histograms and process figures are there to be read.
    for q in [
        "portfleet_ingest_batch_duration_seconds_count{job=\"controller\"} > 0",
        "portfleet_db_query_duration_seconds_count{op=\"apply_results\"} > 0",
        "portfleet_grpc_request_duration_seconds_count{method=\"CreateScan\"} > 0",
        "process_resident_memory_bytes{job=\"agent\"} > 0",
        "portfleet_db_pool_connections{job=\"controller\",pool=\"fleet\",state=\"idle\"} >= 0",
        "portfleet_agent_heartbeat_rtt_seconds_count > 0",
    ] {
        eventually(q, Duration::from_secs(60), || async move { query(p, q).await.map(|_| ()) }).await;
    }
    // No label carries a scan id or an address.
    let (_, exposition) = get(ctl_metrics, "/metrics").await.expect("scrape");
    assert!(!exposition.contains(&scan.id) && !exposition.contains("198.18."), "{exposition}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_database_and_the_broker() {
    portfleet_tests::init_tracing();
    let pg = PgCluster::start().await;
    let logs = tempfile::tempdir().unwrap();
    let ip: IpAddr = "127.0.0.1".parse().unwrap();
    let listen = format!("127.0.0.1:{}", free_port(ip));
    let metrics = SocketAddr::new(ip, free_port(ip));
    let flag = metrics.to_string();
    let _controller = procs::controller("controller", &pg.url(), &listen, &["--metrics-listen", &flag], &logs);
    let status = async |path: &'static str| get(metrics, path).await;
    eventually("ready", Duration::from_secs(30), || async { (status("/readyz").await?.0 == 200).then_some(()) }).await;
    let (code, body) = status("/ready").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("postgres: ok") && body.contains("migrations: ok"), "{body}");

    pg.stop().await;
    let body = eventually("not ready without Postgres", Duration::from_secs(20), || async {
        let (code, body) = status("/readyz").await?;
        (code == 503).then_some(body)
    })
    .await;
    assert!(body.contains("postgres: failing"), "{body}");
    for path in ["/healthz", "/health"] {
        assert_eq!(status(path).await.unwrap().0, 200, "{path}: the process is alive all along");
    }
    pg.start_again().await;
    eventually("ready again", Duration::from_secs(30), || async { (status("/readyz").await?.0 == 200).then_some(()) })
        .await;

    // An ingress that cannot reach its broker keeps the controller unready
    // and says why.
    let dead_broker = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port(ip));
    let listen = format!("127.0.0.1:{}", free_port(ip));
    let metrics = SocketAddr::new(ip, free_port(ip));
    let flag = metrics.to_string();
    let _no_broker = procs::controller(
        "controller-no-broker",
        &pg.url(),
        &listen,
        &["--metrics-listen", &flag, "--amqp-url", &dead_broker],
        &logs,
    );
    let body = eventually("not ready without the broker", Duration::from_secs(30), || async move {
        let (code, body) = get(metrics, "/readyz").await?;
        (code == 503 && body.contains("postgres: ok")).then_some(body)
    })
    .await;
    assert!(body.contains("amqp: failing"), "{body}");
}

#[tokio::test]
async fn a_metrics_port_in_use_is_a_clear_start_up_error() {
    let db = TestDb::create().await;
    let logs = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1".parse().unwrap()));
    let mut controller = procs::controller("controller", db.url(), &listen, &["--metrics-listen", &busy], &logs);
    let status = controller.wait_exit(Duration::from_secs(30)).expect("the controller exits");
    assert!(!status.success());
    let log = controller.log();
    assert!(log.contains(&format!("--metrics-listen {busy}")), "{log}");
}
