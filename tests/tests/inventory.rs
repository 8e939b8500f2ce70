//! Network memory end to end: real agents scan targets in a namespace
//! whose open ports the test changes between scans; two controllers on one
//! database keep one inventory. The inventory, ListChanges, DiffScans and
//! Debian's `ndiff` on two nmap XML exports must report exactly the real
//! changes - none for a scan over other ports or one cancelled midway.
//! Webhooks are received by a real HTTP server (Python's http.server),
//! `scan.changes` from RabbitMQ, and retention prunes while a scan ingests.

use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use portfleet_proto::{auth::ApiClient, v1 as pb};
use portfleet_tests::{
    TestDb,
    amqp::TestBroker,
    eventually,
    netns::NetTopology,
    procs::{self, Proc, free_port},
};
use tonic::{Code, transport::Channel};

const H1: &str = "198.18.1.50";
const H2: &str = "198.18.1.51";
/// Many open ports, for the scan that ingests while retention prunes.
const H3: &str = "198.18.1.52";
const BULK: std::ops::Range<u16> = 20_000..22_000;
const CTL_ARGS: &[&str] = &["--lease-ttl", "2s", "--heartbeat-interval", "500ms", "--allow", "198.18.0.0/15"];
const PORTS: &str = "22,80,443,8080";

fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

struct Lab {
    topo: NetTopology,
    db: TestDb,
    logs: tempfile::TempDir,
    _procs: Vec<Proc>,
    urls: Vec<String>,
    token: String,
}

impl Lab {
    async fn new(broker: &TestBroker) -> Option<Self> {
        portfleet_tests::init_tracing();
        let topo = NetTopology::create_with_controller_link()?;
        let db = TestDb::create().await;
        let logs = tempfile::tempdir().unwrap();
        let ip = std::net::IpAddr::V4(topo.controller_ip.expect("management link"));
        let amqp = broker.controller_args();
        let mut procs = Vec::new();
        let mut urls = Vec::new();
        for name in ["controller-a", "controller-b"] {
            let listen = format!("{ip}:{}", free_port(ip));
            let args: Vec<&str> = CTL_ARGS.iter().copied().chain(amqp.iter().map(String::as_str)).collect();
            procs.push(procs::controller(name, db.url(), &listen, &args, &logs));
            urls.push(format!("http://{listen}"));
        }
        // The agent works for controller a; the API calls go to b.
        procs.push(procs::agent(&topo, "inv-agent", &urls[0], &[], &logs));
        let token = db.token(portfleet_controller::auth::Scope::Admin).await;
        Some(Self { topo, db, logs, _procs: procs, urls, token })
    }

    async fn api(&self) -> ApiClient {
        let url = self.urls[1].clone();
        let channel = eventually("the controller to answer", Duration::from_secs(30), || {
            let url = url.clone();
            async move { Channel::from_shared(url).ok()?.connect().await.ok() }
        })
        .await;
        portfleet_proto::auth::client(channel, portfleet_proto::auth::Bearer::new(&self.token).unwrap())
    }

    fn cli(&self, args: &[&str]) -> String {
        let out = Command::new(portfleet_tests::binary("portfleet"))
            .args(["--controller", &self.urls[1], "--token", &self.token])
            .args(args)
            .output()
            .expect("run portfleet");
        assert!(out.status.success(), "portfleet {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }
}

async fn create(api: &mut ApiClient, ports: &str, rate: u32) -> pb::Scan {
    api.create_scan(pb::CreateScanRequest {
        targets: vec![format!("{H1}-{H2}")],
        ports: ports.into(),
        rate,
        identify: Some(false),
        ..Default::default()
    })
    .await
    .expect("create scan")
    .into_inner()
}

async fn finish(api: &ApiClient, id: &str) -> pb::Scan {
    eventually("the scan to end", Duration::from_secs(120), || {
        let (mut api, id) = (api.clone(), id.to_string());
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (s.state != pb::ScanState::Pending as i32 && s.state != pb::ScanState::Running as i32).then_some(s)
        }
    })
    .await
}

/// Waits for the scan's `scan.changes` message and returns its changes as
/// ("opened"/"closed", "ip:port"), checking its counts.
async fn changes_message(
    events: &mut tokio::sync::mpsc::Receiver<(String, Vec<u8>, lapin::BasicProperties)>,
    scan_id: &str,
) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    loop {
        let (key, body, _) = tokio::time::timeout(Duration::from_secs(60), events.recv())
            .await
            .unwrap_or_else(|_| panic!("no scan.changes for {scan_id}"))
            .expect("events channel");
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if key != "scan.changes" || v["scan_id"] != scan_id {
            continue;
        }
        for c in v["changes"].as_array().unwrap() {
            out.insert((
                c["kind"].as_str().unwrap().to_string(),
                format!("{}:{}", c["ip"].as_str().unwrap(), c["port"]),
            ));
        }
        let counts = &v["counts"];
        let total = counts["opened"].as_u64().unwrap()
            + counts["closed"].as_u64().unwrap()
            + counts["service_changed"].as_u64().unwrap();
        if v["page"] == v["pages"] {
            assert_eq!(total as usize, out.len(), "counts and changes of {v}");
            return out;
        }
    }
}

async fn list_changes(api: &mut ApiClient, scan_id: &str) -> BTreeSet<(String, String)> {
    let r = api
        .list_changes(pb::ListChangesRequest { scan_id: scan_id.into(), page_size: 1000, ..Default::default() })
        .await
        .expect("ListChanges")
        .into_inner();
    r.changes
        .iter()
        .map(|c| {
            let kind = match pb::ChangeKind::try_from(c.kind).unwrap() {
                pb::ChangeKind::Opened => "opened",
                pb::ChangeKind::Closed => "closed",
                pb::ChangeKind::ServiceChanged => "service_changed",
                pb::ChangeKind::Unspecified => "?",
            };
            (kind.to_string(), format!("{}:{}", c.ip, c.port))
        })
        .collect()
}

fn set(items: &[(&str, &str)]) -> BTreeSet<(String, String)> {
    items.iter().map(|(k, a)| (k.to_string(), a.to_string())).collect()
}

/// A real HTTP server receiving webhooks: `/ok` answers 200, `/fail` 500,
/// `/hang` never answers. Each request is appended to `log` as JSON.
fn webhook_server(dir: &Path, logs: &tempfile::TempDir) -> (Proc, u16, PathBuf) {
    let log = dir.join("hooks.jsonl");
    let script = dir.join("hooks.py");
    std::fs::write(
        &script,
        r#"
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
log = open(sys.argv[2], "a")
class H(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        log.write(json.dumps({"path": self.path, "headers": dict(self.headers), "body": body.decode()}) + "\n")
        log.flush()
        if self.path == "/hang":
            time.sleep(120)
        self.send_response(500 if self.path == "/fail" else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#,
    )
    .unwrap();
    let port = free_port("127.0.0.1".parse().unwrap());
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(port.to_string()).arg(&log);
    (Proc::spawn_command("hooks", cmd, logs), port, log)
}

fn hook_requests(log: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// What Debian's ndiff says changed between two nmap XML files:
/// ("opened"/"closed", "ip:port") for ports open on one side only.
fn ndiff(a: &Path, b: &Path) -> BTreeSet<(String, String)> {
    let out = Command::new("ndiff").arg(a).arg(b).output().expect("run ndiff (Debian package ndiff)");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut host = String::new();
    let mut changes = BTreeSet::new();
    for line in text.lines() {
        let trimmed = line.trim_start_matches(['+', '-', ' ']);
        if let Some(h) = trimmed.strip_suffix(':')
            && h.parse::<std::net::IpAddr>().is_ok()
        {
            host = h.to_string();
            continue;
        }
        let sign = line.chars().next();
        let mut f = trimmed.split_whitespace();
        let (Some(port), Some(state)) = (f.next(), f.next()) else { continue };
        let Some(port) = port.strip_suffix("/tcp") else { continue };
        if state != "open" {
            continue;
        }
        match sign {
            Some('+') => changes.insert(("opened".into(), format!("{host}:{port}"))),
            Some('-') => changes.insert(("closed".into(), format!("{host}:{port}"))),
            _ => false,
        };
    }
    changes
}

#[tokio::test]
async fn the_inventory_reports_exactly_the_real_changes() {
    let broker = TestBroker::new().await;
    let Some(lab) = Lab::new(&broker).await else { return };
    let mut events = broker.listen(&broker.config.events_exchange, "scan.changes").await;
    let mut api = lab.api().await;
    let dir = tempfile::tempdir().unwrap();
    let (_hooks, hook_port, hook_log) = webhook_server(dir.path(), &lab.logs);

    // Webhooks: bad URLs refused; one receiver that takes them, one that
    // fails, one that hangs.
    for bad in ["ftp://127.0.0.1/x", "127.0.0.1:9/x", "http://"] {
        let e = api.create_webhook(pb::CreateWebhookRequest { url: bad.into(), events: vec![] }).await.expect_err(bad);
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}: {e:?}");
    }
    let e = api
        .create_webhook(pb::CreateWebhookRequest {
            url: format!("http://127.0.0.1:{hook_port}/ok"),
            events: vec!["scan.exploded".into()],
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let hook = |path: &str| pb::CreateWebhookRequest {
        url: format!("http://127.0.0.1:{hook_port}/{path}"),
        events: vec!["scan.changes".into()],
    };
    let ok = api.create_webhook(hook("ok")).await.unwrap().into_inner();
    let failing = api.create_webhook(hook("fail")).await.unwrap().into_inner();
    let hanging = api.create_webhook(hook("hang")).await.unwrap().into_inner();
    assert_eq!(ok.secret.len(), 64);
    let listed = api.list_webhooks(pb::ListWebhooksRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.webhooks.len(), 3);
    assert!(listed.webhooks.iter().all(|w| w.secret.is_empty()), "secrets are shown once");

    // Scan 1: three open ports.
    let l22 = lab.topo.listen(&[addr(H1, 22)]);
    let l80 = lab.topo.listen(&[addr(H1, 80)]);
    let _l443 = lab.topo.listen(&[addr(H2, 443)]);
    let s1 = create(&mut api, PORTS, 2000).await;
    assert_eq!(finish(&api, &s1.id).await.state, pb::ScanState::Completed as i32);
    let first = set(&[("opened", "198.18.1.50:22"), ("opened", "198.18.1.50:80"), ("opened", "198.18.1.51:443")]);
    assert_eq!(changes_message(&mut events, &s1.id).await, first);
    assert_eq!(list_changes(&mut api, &s1.id).await, first);

    // Scan 2: 80 closed, 8080 opened.
    drop(l80);
    let _l8080 = lab.topo.listen(&[addr(H1, 8080)]);
    let s2 = create(&mut api, PORTS, 2000).await;
    finish(&api, &s2.id).await;
    let second = set(&[("closed", "198.18.1.50:80"), ("opened", "198.18.1.50:8080")]);
    assert_eq!(changes_message(&mut events, &s2.id).await, second);
    assert_eq!(list_changes(&mut api, &s2.id).await, second);
    let host = api.get_host(pb::GetHostRequest { ip: H1.into() }).await.unwrap().into_inner();
    assert_eq!(host.open_port_count, 2, "{host:?}");
    let states: Vec<(u32, i32)> = host.ports.iter().map(|p| (p.port, p.state)).collect();
    assert_eq!(
        states,
        vec![(22, pb::PortState::Open as i32), (80, pb::PortState::Closed as i32), (8080, pb::PortState::Open as i32)]
    );
    let p80 = host.ports.iter().find(|p| p.port == 80).unwrap();
    assert_eq!(p80.last_scan_id, s2.id);
    assert_eq!(host.changes.len(), 4, "{:?}", host.changes);

    // DiffScans agrees, and so does ndiff on the nmap XML exports.
    let d = api
        .diff_scans(pb::DiffScansRequest { a: s1.id.clone(), b: s2.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((d.opened, d.closed, d.unchanged, d.only_a, d.only_b), (1, 1, 2, 0, 0), "{d:?}");
    assert_eq!((d.covered_by_a, d.covered_by_b), (8, 8));
    let diffed: BTreeSet<(String, String)> = d
        .entries
        .iter()
        .map(|e| {
            let kind = if e.kind == pb::DiffKind::Opened as i32 { "opened" } else { "closed" };
            (kind.to_string(), format!("{}:{}", e.ip, e.port))
        })
        .collect();
    assert_eq!(diffed, second);
    let xml = |id: &str, name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, lab.cli(&["results", id, "--format", "nmap-xml"])).unwrap();
        path
    };
    assert_eq!(ndiff(&xml(&s1.id, "s1.xml"), &xml(&s2.id, "s2.xml")), second, "ndiff and DiffScans differ");

    // ListHosts and the CLI over the same inventory.
    let hosts = |cidr: &str, open_port: Option<u32>| {
        let mut api = api.clone();
        let r = pb::ListHostsRequest { cidr: cidr.into(), open_port, ..Default::default() };
        async move {
            let h = api.list_hosts(r).await.unwrap().into_inner().hosts;
            h.into_iter().map(|h| (h.ip, h.open_port_count)).collect::<Vec<_>>()
        }
    };
    assert_eq!(hosts("198.18.1.48/28", None).await, vec![(H1.to_string(), 2), (H2.to_string(), 1)]);
    assert_eq!(hosts("198.18.1.48/28", Some(443)).await, vec![(H2.to_string(), 1)]);
    assert_eq!(hosts("198.18.1.48/28", Some(80)).await, vec![], "80 is closed now");
    let lines = lab.cli(&["changes", "--scan", &s2.id, "--format", "jsonl"]);
    assert_eq!(lines.lines().count(), 2, "{lines}");
    assert!(lines.contains("\"closed\"") && lines.contains("8080"), "{lines}");
    let csv = lab.cli(&["hosts", "--cidr", "198.18.1.48/28", "--format", "csv"]);
    assert_eq!(csv.lines().count(), 3, "a header and two hosts: {csv}");
    let diff = lab.cli(&["diff", &s1.id, &s2.id]);
    assert!(diff.contains("198.18.1.50:8080") && diff.contains("198.18.1.50:80"), "{diff}");

    // Scan 3 covers other ports only: nothing changes.
    let s3 = create(&mut api, "443,9999", 2000).await;
    finish(&api, &s3.id).await;
    assert_eq!(changes_message(&mut events, &s3.id).await, set(&[]));
    let d = api
        .diff_scans(pb::DiffScansRequest { a: s2.id.clone(), b: s3.id.clone(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((d.opened, d.closed, d.unchanged, d.only_a, d.only_b), (0, 0, 1, 2, 0), "{d:?}");

    // Scan 4 is cancelled long before it probes most ports: no phantom
    // closes of what it never reached.
    drop(l22);
    let s4 = create(&mut api, "1-65535", 300).await;
    eventually("scan 4 to run", Duration::from_secs(30), || {
        let (mut api, id) = (api.clone(), s4.id.clone());
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (s.probes_done > 0).then_some(())
        }
    })
    .await;
    api.cancel_scan(pb::CancelScanRequest { id: s4.id.clone() }).await.unwrap();
    let cancelled = finish(&api, &s4.id).await;
    assert_eq!(cancelled.state, pb::ScanState::Cancelled as i32);
    let fourth = changes_message(&mut events, &s4.id).await;
    // Only 22 really closed; it is reported only if the scan got to it.
    assert!(fourth.is_subset(&set(&[("closed", "198.18.1.50:22")])), "phantom changes: {fourth:?}");
    let host = api.get_host(pb::GetHostRequest { ip: H2.into() }).await.unwrap().into_inner();
    assert_eq!(host.ports[0].state, pb::PortState::Open as i32);

    // Two controllers, one inventory: every change recorded once.
    let mut conn = lab.db.connect().await;
    let dupes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM inventory_changes GROUP BY scan_id, ip, port, kind HAVING count(*) > 1) d",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    assert_eq!(dupes, 0);

    // Webhooks: the good receiver got every scan.changes, signed; the
    // failing one is retried and logged with its status; the hanging one
    // times out.
    let got = eventually("webhooks for four scans", Duration::from_secs(30), || {
        let got: Vec<serde_json::Value> = hook_requests(&hook_log).into_iter().filter(|r| r["path"] == "/ok").collect();
        async move { (got.len() >= 4).then_some(got) }
    })
    .await;
    for r in &got {
        let body = r["body"].as_str().unwrap();
        let sig = r["headers"]["x-portfleet-signature"].as_str().unwrap();
        assert_eq!(sig, portfleet_controller::webhooks::sign(&ok.secret, body.as_bytes()));
        assert_eq!(r["headers"]["x-portfleet-event"], "scan.changes");
    }
    let ids: BTreeSet<String> = got
        .iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(r["body"].as_str().unwrap()).unwrap()["scan_id"].to_string())
        .collect();
    assert_eq!(ids.len(), 4);
    let log = |id: String| {
        let mut api = api.clone();
        async move {
            api.list_webhook_deliveries(pb::ListWebhookDeliveriesRequest { webhook_id: id, ..Default::default() })
                .await
                .unwrap()
                .into_inner()
                .deliveries
        }
    };
    eventually("the deliveries to be logged as delivered", Duration::from_secs(20), || {
        let log = log(ok.id.clone());
        async move {
            let d = log.await;
            eprintln!(
                "{:?}",
                d.iter().map(|d| (d.state, d.attempts, d.last_status, &d.last_error)).collect::<Vec<_>>()
            );
            d.iter().all(|d| d.state == pb::DeliveryState::Delivered as i32).then_some(())
        }
    })
    .await;
    let failed = log(failing.id.clone()).await;
    assert!(
        failed.iter().any(|d| d.last_status == 500 && d.attempts >= 1 && d.state == pb::DeliveryState::Pending as i32),
        "{failed:?}"
    );
    let hung = eventually("the hanging receiver to time out", Duration::from_secs(30), || {
        let log = log(hanging.id.clone());
        async move {
            let d = log.await;
            d.iter().any(|d| d.last_error.contains("no answer")).then_some(d)
        }
    })
    .await;
    assert!(hung.iter().all(|d| d.last_status == 0));

    // Retention prunes the finished scans while scan 5 ingests 2,000 open
    // ports: the ingest loses nothing, the inventory keeps its history.
    let _bulk = lab.topo.listen(&BULK.map(|p| addr(H3, p)).collect::<Vec<_>>());
    let s5 = api
        .create_scan(pb::CreateScanRequest {
            targets: vec![H3.into()],
            ports: format!("{}-{}", BULK.start, BULK.end - 1),
            // Slow enough to be ingesting while the old scans are pruned.
            rate: 100,
            identify: Some(false),
            port_threshold: Some(0),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    eventually("scan 5 to find ports", Duration::from_secs(30), || {
        let (mut api, id) = (api.clone(), s5.id.clone());
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (s.open_ports > 0).then_some(())
        }
    })
    .await;
    let e = api.delete_scan(pb::DeleteScanRequest { id: s5.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "a running scan is not deleted: {e:?}");
    api.update_retention(pb::UpdateRetentionRequest {
        retain_scans: Some(prost_types::Duration { seconds: 1, nanos: 0 }),
    })
    .await
    .unwrap();
    let old = [&s1.id, &s2.id, &s3.id, &s4.id];
    eventually("retention to prune the old scans", Duration::from_secs(60), || {
        let api = api.clone();
        let old: Vec<String> = old.iter().map(|s| s.to_string()).collect();
        async move {
            for id in old {
                let e = api.clone().get_scan(pb::GetScanRequest { id }).await.err()?;
                (e.code() == Code::NotFound).then_some(())?;
            }
            Some(())
        }
    })
    .await;
    // Kept for ever again before scan 5 ends (or it would go too).
    api.update_retention(pb::UpdateRetentionRequest { retain_scans: None }).await.unwrap();
    let done = finish(&api, &s5.id).await;
    assert_eq!(done.state, pb::ScanState::Completed as i32);
    let mut found = 0;
    let mut token = String::new();
    loop {
        let page = api
            .list_results(pb::ListResultsRequest {
                scan_id: s5.id.clone(),
                page_size: 1000,
                page_token: token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        found += page.results.len();
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    assert_eq!(found, BULK.len(), "scan 5 lost results while retention pruned");
    eventually("the pruned scans' rows to go", Duration::from_secs(60), || {
        let url = lab.db.url().to_string();
        let old: Vec<uuid::Uuid> = old.iter().map(|s| s.parse().unwrap()).collect();
        async move {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.ok()?;
            let left: i64 = sqlx::query_scalar("SELECT count(*) FROM results WHERE scan_id = ANY($1)")
                .bind(&old)
                .fetch_one(&mut conn)
                .await
                .ok()?;
            let scans: i64 = sqlx::query_scalar("SELECT count(*) FROM scans WHERE id = ANY($1)")
                .bind(&old)
                .fetch_one(&mut conn)
                .await
                .ok()?;
            (left == 0 && scans == 0).then_some(())
        }
    })
    .await;
    // The history outlives the scans.
    let e =
        api.list_changes(pb::ListChangesRequest { scan_id: s2.id.clone(), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let history = api
        .list_changes(pb::ListChangesRequest { cidr: H1.into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .changes;
    assert!(history.iter().any(|c| c.scan_id == s2.id && c.port == 80), "{history:?}");
    let host = api.get_host(pb::GetHostRequest { ip: H1.into() }).await.unwrap().into_inner();
    assert!(host.ports.iter().any(|p| p.port == 8080 && p.state == pb::PortState::Open as i32));
}

#[tokio::test]
async fn bad_inventory_requests_get_clear_statuses() {
    let broker = TestBroker::new().await;
    let Some(lab) = Lab::new(&broker).await else { return };
    let mut api = lab.api().await;
    let _l = lab.topo.listen(&[addr(H1, 22)]);
    let s = create(&mut api, "22", 2000).await;
    finish(&api, &s.id).await;
    let unknown = uuid::Uuid::now_v7().to_string();
    let code = |r: Result<tonic::Response<pb::DiffScansResponse>, tonic::Status>| r.unwrap_err().code();
    let diff = |a: &str, b: &str, token: &str| pb::DiffScansRequest {
        a: a.into(),
        b: b.into(),
        page_token: token.into(),
        ..Default::default()
    };
    assert_eq!(code(api.diff_scans(diff(&s.id, &s.id, "")).await), Code::InvalidArgument);
    assert_eq!(code(api.diff_scans(diff(&s.id, &unknown, "")).await), Code::NotFound);
    assert_eq!(code(api.diff_scans(diff(&s.id, "nope", "")).await), Code::InvalidArgument);
    // A token from another list.
    let s2 = create(&mut api, "22", 2000).await;
    finish(&api, &s2.id).await;
    let e = api.diff_scans(diff(&s.id, &s2.id, "eyJsaXN0IjoiaG9zdHMiLCJhZnRlciI6eyJpcCI6IjEuMi4zLjQifX0")).await;
    assert_eq!(code(e), Code::InvalidArgument);
    for cidr in ["10.0.0.0/33", "nonsense", "1.2.3.4/x"] {
        let e = api.list_hosts(pb::ListHostsRequest { cidr: cidr.into(), ..Default::default() }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{cidr}");
        let e = api
            .list_results(pb::ListResultsRequest { scan_id: s.id.clone(), cidr: cidr.into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{cidr}");
    }
    let e = api.list_changes(pb::ListChangesRequest { port: Some(70_000), ..Default::default() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = api.get_host(pb::GetHostRequest { ip: "198.18.9.9".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = api.get_host(pb::GetHostRequest { ip: "not-an-ip".into() }).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = api.delete_scan(pb::DeleteScanRequest { id: unknown.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = api.delete_webhook(pb::DeleteWebhookRequest { id: unknown }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    // ListResults filters and a token bound to them.
    let page = api
        .list_results(pb::ListResultsRequest { scan_id: s.id.clone(), port: Some(22), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.results.len(), 1);
    let none = api
        .list_results(pb::ListResultsRequest {
            scan_id: s.id.clone(),
            cidr: "198.18.2.0/24".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.results.is_empty());
    // Deleting a finished scan: gone at once.
    api.delete_scan(pb::DeleteScanRequest { id: s.id.clone() }).await.unwrap();
    let e = api.get_scan(pb::GetScanRequest { id: s.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = api.delete_scan(pb::DeleteScanRequest { id: s.id.clone() }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
}
