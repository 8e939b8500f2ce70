//! The ScanService over real TCP against a real Postgres: targets, scans,
//! pagination, idempotency, cancellation, and every bad input with its
//! exact status code.

use std::{collections::HashSet, time::Duration};

use portfleet_proto::{auth::ApiClient, v1 as pb};
use portfleet_tests::{TcpProxy, TestController, TestDb, eventually};
use sqlx::Row;
use tonic::Code;

async fn setup() -> (TestDb, TestController, ApiClient) {
    let db = TestDb::create().await;
    let controller = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let client = controller.client().await;
    (db, controller, client)
}

fn scan_req(targets: &[&str], ports: &str) -> pb::CreateScanRequest {
    pb::CreateScanRequest {
        targets: targets.iter().map(|t| t.to_string()).collect(),
        ports: ports.into(),
        ..Default::default()
    }
}

fn target(value: &str, group: &str, enabled: Option<bool>) -> pb::Target {
    pb::Target { value: value.into(), group: group.into(), enabled, ..Default::default() }
}

#[track_caller]
fn assert_status<T: std::fmt::Debug>(res: Result<T, tonic::Status>, code: Code, needles: &[&str]) {
    let status = res.expect_err("expected an error status");
    assert_eq!(status.code(), code, "status: {status:?}");
    for needle in needles {
        assert!(status.message().contains(needle), "{:?} does not contain {needle:?}", status.message());
    }
}

#[tokio::test]
async fn targets_are_stored_listed_and_deleted() {
    let (_db, _c, mut client) = setup().await;
    let created = client
        .create_targets(pb::CreateTargetsRequest {
            targets: vec![
                target("203.0.113.0/24", "corp", None),
                target("Example.COM", "corp", Some(false)),
                target("203.0.113.5", "", None),
                target("192.0.2.1-192.0.2.9", "lab", None),
                target("2001:db8::1", "lab", Some(true)),
            ],
        })
        .await
        .unwrap()
        .into_inner()
        .targets;
    assert_eq!(created.len(), 5);
    let example = created.iter().find(|t| t.value == "example.com").unwrap();
    assert_eq!(example.kind, pb::TargetKind::Hostname as i32);
    assert_eq!(example.enabled, Some(false));
    assert_eq!(created[3].kind, pb::TargetKind::Range as i32);

    // Creating again updates in place: same ids, no new rows.
    let again = client
        .create_targets(pb::CreateTargetsRequest { targets: vec![target("example.com", "corp", Some(true))] })
        .await
        .unwrap()
        .into_inner()
        .targets;
    assert_eq!(again[0].id, example.id);
    assert_eq!(again[0].enabled, Some(true));

    // Pages of two walk all five, once each.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_targets(pb::ListTargetsRequest { page_size: 2, page_token: token.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        assert!(page.targets.len() <= 2);
        seen.extend(page.targets.into_iter().map(|t| t.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), 5);
    assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 5);

    let lab = client
        .list_targets(pb::ListTargetsRequest { group: Some("lab".into()), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(lab.targets.len(), 2);

    client.delete_target(pb::DeleteTargetRequest { id: lab.targets[0].id.clone() }).await.unwrap();
    assert_status(
        client.delete_target(pb::DeleteTargetRequest { id: lab.targets[0].id.clone() }).await,
        Code::NotFound,
        &[&lab.targets[0].id],
    );
    assert_status(
        client
            .create_targets(pb::CreateTargetsRequest {
                targets: vec![target("192.0.2.1", "", None), target("192.0.2.0/40", "", None)],
            })
            .await,
        Code::InvalidArgument,
        &["targets[1].value", "192.0.2.0/40"],
    );
    assert_status(
        client.create_targets(pb::CreateTargetsRequest { targets: vec![] }).await,
        Code::InvalidArgument,
        &["targets"],
    );
}

#[tokio::test]
async fn scans_by_address_cidr_hostname_and_group() {
    let (db, _c, mut client) = setup().await;

    let one = client.create_scan(scan_req(&["198.51.100.7"], "22,80,443")).await.unwrap().into_inner();
    assert_eq!(one.state, pb::ScanState::Pending as i32);
    assert_eq!((one.address_count, one.port_count, one.probes_planned), (1, 3, 3));
    let request = one.request.as_ref().unwrap();
    assert_eq!(request.ports, "22,80,443");
    assert_eq!(request.scan_type, pb::ScanType::Syn as i32);
    assert_eq!((request.rate, request.retries), (1000, Some(1)));

    let cidr = client.create_scan(scan_req(&["198.51.100.0/24", "198.51.100.9"], "80,443")).await.unwrap().into_inner();
    assert_eq!((cidr.address_count, cidr.probes_planned), (256, 512));
    assert_eq!(cidr.request.as_ref().unwrap().targets, ["198.51.100.0/24", "198.51.100.9"]);

    // A /15 plans without expanding, cut into at most 4096 shards.
    let big = client.create_scan(scan_req(&["198.18.0.0/15"], "top-1000")).await.unwrap().into_inner();
    assert_eq!(big.probes_planned, 1000 << 17);
    assert_eq!(big.shard_count, 4096);

    let named = client.create_scan(scan_req(&["localhost"], "top-1000")).await.unwrap().into_inner();
    assert!(named.address_count >= 1);
    assert_eq!(named.port_count, 1000);
    let mut conn = db.connect().await;
    let hosts = sqlx::query("SELECT host(ip) AS ip, hostname FROM scan_hosts WHERE scan_id = $1::uuid")
        .bind(&named.id)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert!(!hosts.is_empty());
    assert!(hosts.iter().all(|r| r.get::<String, _>("hostname") == "localhost"));
    assert!(hosts.iter().any(|r| r.get::<String, _>("ip") == "127.0.0.1"));

    client
        .create_targets(pb::CreateTargetsRequest {
            targets: vec![
                target("203.0.113.0/28", "dmz", None),
                target("203.0.113.100", "dmz", None),
                target("203.0.113.200", "dmz", Some(false)),
                target("198.51.100.1", "other", None),
            ],
        })
        .await
        .unwrap();
    let group = client
        .create_scan(pb::CreateScanRequest { target_group: "dmz".into(), ports: "443".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    // 16 + 1 enabled addresses; the disabled one and the other group are out.
    assert_eq!(group.address_count, 17);
    assert_eq!(group.request.as_ref().unwrap().target_group, "dmz");

    // Shards tile the index space exactly.
    let rows = sqlx::query(
        "SELECT start_index, end_index, checkpoint, state FROM shards WHERE scan_id = $1::uuid ORDER BY shard_no",
    )
    .bind(&big.id)
    .fetch_all(&mut conn)
    .await
    .unwrap();
    assert_eq!(rows.len(), 4096);
    let mut next = 0i64;
    for r in &rows {
        assert_eq!(r.get::<i64, _>("start_index"), next);
        assert_eq!(r.get::<i64, _>("checkpoint"), next);
        assert_eq!(r.get::<String, _>("state"), "pending");
        next = r.get("end_index");
    }
    assert_eq!(next as u64, big.probes_planned);

    let got = client.get_scan(pb::GetScanRequest { id: group.id.clone() }).await.unwrap().into_inner();
    assert_eq!(got, group);
}

#[tokio::test]
async fn list_scans_paginates_newest_first_and_filters() {
    let (_db, _c, mut client) = setup().await;
    let mut created = Vec::new();
    for i in 0..7 {
        let s = client.create_scan(scan_req(&[&format!("198.51.100.{i}")], "80")).await.unwrap().into_inner();
        created.push(s.id);
    }
    let mut pages = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_scans(pb::ListScansRequest { page_size: 3, page_token: token.clone(), ..Default::default() })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.scans.iter().map(|s| s.id.clone()).collect::<Vec<_>>());
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    let listed: Vec<String> = pages.concat();
    let newest_first: Vec<String> = created.iter().rev().cloned().collect();
    assert_eq!(listed, newest_first);

    client.cancel_scan(pb::CancelScanRequest { id: created[2].clone() }).await.unwrap();
    let cancelled = client
        .list_scans(pb::ListScansRequest { state: pb::ScanState::Cancelled as i32, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.scans.len(), 1);
    assert_eq!(cancelled.scans[0].id, created[2]);
    let pending = client
        .list_scans(pb::ListScansRequest { state: pb::ScanState::Pending as i32, page_size: 100, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pending.scans.len(), 6);
    // A page never exceeds the server's maximum, whatever is asked.
    let huge = client
        .list_scans(pb::ListScansRequest { page_size: u32::MAX, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(huge.scans.len(), 7);
}

#[tokio::test]
async fn request_id_returns_the_same_scan() {
    let (db, _c, client) = setup().await;
    let mut req = scan_req(&["198.51.100.0/29"], "80");
    req.request_id = "order-42".into();
    let first = client.clone().create_scan(req.clone()).await.unwrap().into_inner();
    let second = client.clone().create_scan(req.clone()).await.unwrap().into_inner();
    assert_eq!(first.id, second.id);

    // Racing requests with a fresh key still make exactly one scan.
    req.request_id = "race".into();
    let results = futures::future::join_all((0..8).map(|_| {
        let mut c = client.clone();
        let r = req.clone();
        async move { c.create_scan(r).await.unwrap().into_inner().id }
    }))
    .await;
    assert_eq!(results.iter().collect::<HashSet<_>>().len(), 1);
    let mut conn = db.connect().await;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM scans").fetch_one(&mut conn).await.unwrap();
    assert_eq!(count, 2);
}

/// A key reused for another request is refused, naming the scan that holds
/// it, like Stripe's idempotency keys; a retry of the same request (even
/// spelled differently: defaults, port order) still gets its scan back.
#[tokio::test]
async fn a_request_id_reused_with_a_different_request_is_refused() {
    let (db, _c, client) = setup().await;
    let mut req = scan_req(&["198.51.100.0/29", "198.51.100.9"], "443,80");
    req.request_id = "job-1".into();
    let first = client.clone().create_scan(req.clone()).await.unwrap().into_inner();
    let mut same = scan_req(&["198.51.100.9", "198.51.100.0/29"], "80,443");
    same.request_id = "job-1".into();
    same.rate = 1000; // the default, spelled out
    assert_eq!(client.clone().create_scan(same).await.unwrap().into_inner().id, first.id);

    let conflict = format!("request_id job-1 was used by scan {} with a different request", first.id);
    let mut other_ports = req.clone();
    other_ports.ports = "22".into();
    assert_status(client.clone().create_scan(other_ports).await, Code::AlreadyExists, &[&conflict]);
    let mut other_targets = req.clone();
    other_targets.targets = vec!["198.51.100.10".into()];
    assert_status(client.clone().create_scan(other_targets).await, Code::AlreadyExists, &[&conflict]);

    // Racing different requests with one fresh key: one scan, the others
    // refused.
    let results = futures::future::join_all((0..6).map(|i| {
        let mut c = client.clone();
        let mut r = scan_req(&["198.51.100.0/29"], &(1000 + i % 2).to_string());
        r.request_id = "race".into();
        async move { c.create_scan(r).await.map(|s| s.into_inner().id).map_err(|e| e.code()) }
    }))
    .await;
    let won: HashSet<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
    assert_eq!(won.len(), 1, "{results:?}");
    assert!(results.iter().all(|r| r.as_ref().is_ok_and(|id| won.contains(id)) || r == &Err(Code::AlreadyExists)));

    // Scans stored before fingerprints were kept match any request.
    let mut conn = db.connect().await;
    sqlx::query("UPDATE scans SET request_fingerprint = NULL WHERE request_id = 'job-1'")
        .execute(&mut conn)
        .await
        .unwrap();
    let mut old = req.clone();
    old.ports = "22".into();
    assert_eq!(client.clone().create_scan(old).await.unwrap().into_inner().id, first.id);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM scans").fetch_one(&mut conn).await.unwrap();
    assert_eq!(count, 2);
}

#[tokio::test]
async fn cancel_moves_scan_and_shards_to_cancelled() {
    let (db, _c, mut client) = setup().await;
    let scan = client.create_scan(scan_req(&["198.51.100.0/24"], "top-1000")).await.unwrap().into_inner();
    assert!(scan.shard_count > 1);
    let cancelled = client.cancel_scan(pb::CancelScanRequest { id: scan.id.clone() }).await.unwrap().into_inner();
    assert_eq!(cancelled.state, pb::ScanState::Cancelled as i32);
    assert!(cancelled.end_time.is_some());
    let mut conn = db.connect().await;
    let open: i64 = sqlx::query_scalar("SELECT count(*) FROM shards WHERE scan_id = $1::uuid AND state <> 'cancelled'")
        .bind(&scan.id)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(open, 0);
    // Idempotent.
    let again = client.cancel_scan(pb::CancelScanRequest { id: scan.id.clone() }).await.unwrap().into_inner();
    assert_eq!(again.state, pb::ScanState::Cancelled as i32);

    let done = client.create_scan(scan_req(&["198.51.100.1"], "80")).await.unwrap().into_inner();
    sqlx::query("UPDATE scans SET state = 'completed' WHERE id = $1::uuid")
        .bind(&done.id)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_status(
        client.cancel_scan(pb::CancelScanRequest { id: done.id.clone() }).await,
        Code::FailedPrecondition,
        &["completed"],
    );
}

#[tokio::test]
async fn bad_input_gets_the_exact_code_and_writes_nothing() {
    let (db, _c, mut client) = setup().await;
    let cases: Vec<(pb::CreateScanRequest, Code, Vec<&str>)> = vec![
        (scan_req(&["192.0.2.1", "192.0.2.256"], "80"), Code::InvalidArgument, vec!["targets[1]", "192.0.2.256"]),
        (scan_req(&["192.0.2.0/33"], "80"), Code::InvalidArgument, vec!["targets[0]", "192.0.2.0/33"]),
        (scan_req(&["bad host name"], "80"), Code::InvalidArgument, vec!["targets[0]", "bad host name"]),
        (scan_req(&["192.0.2.1"], "80,99999"), Code::InvalidArgument, vec!["ports", "99999"]),
        (scan_req(&["192.0.2.1"], "top-7"), Code::InvalidArgument, vec!["ports", "top-7"]),
        (scan_req(&[], "80"), Code::InvalidArgument, vec!["targets"]),
        (scan_req(&["198.18.0.0/15"], "full"), Code::InvalidArgument, vec!["8589803520", "4294967296"]),
        (scan_req(&["no-such-host.invalid"], "80"), Code::InvalidArgument, vec!["targets[0]", "no-such-host.invalid"]),
        (
            pb::CreateScanRequest { target_group: "empty".into(), ..Default::default() },
            Code::InvalidArgument,
            vec!["target_group", "empty"],
        ),
        (
            pb::CreateScanRequest { scan_type: 99, ..scan_req(&["192.0.2.1"], "80") },
            Code::InvalidArgument,
            vec!["scan_type"],
        ),
        (
            pb::CreateScanRequest { retries: Some(1000), ..scan_req(&["192.0.2.1"], "80") },
            Code::InvalidArgument,
            vec!["retries"],
        ),
    ];
    for (req, code, needles) in cases {
        assert_status(client.create_scan(req).await, code, &needles);
    }
    let mut conn = db.connect().await;
    let rows: i64 = sqlx::query_scalar("SELECT (SELECT count(*) FROM scans) + (SELECT count(*) FROM shards)")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(rows, 0, "a refused scan left rows behind");

    let unknown = uuid::Uuid::now_v7().to_string();
    assert_status(client.get_scan(pb::GetScanRequest { id: unknown.clone() }).await, Code::NotFound, &[&unknown]);
    assert_status(client.cancel_scan(pb::CancelScanRequest { id: unknown.clone() }).await, Code::NotFound, &[&unknown]);
    assert_status(
        client.list_results(pb::ListResultsRequest { scan_id: unknown.clone(), ..Default::default() }).await,
        Code::NotFound,
        &[&unknown],
    );
    assert_status(
        client.get_scan(pb::GetScanRequest { id: "nope".into() }).await,
        Code::InvalidArgument,
        &["id", "nope"],
    );
    assert_status(
        client.list_scans(pb::ListScansRequest { page_token: "garbage!".into(), ..Default::default() }).await,
        Code::InvalidArgument,
        &["page_token"],
    );
    // A token from another list is refused too.
    for i in 0..3 {
        client
            .create_targets(pb::CreateTargetsRequest { targets: vec![target(&format!("198.51.100.{i}"), "", None)] })
            .await
            .unwrap();
    }
    let token = client
        .list_targets(pb::ListTargetsRequest { page_size: 1, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .next_page_token;
    assert!(!token.is_empty());
    assert_status(
        client.list_scans(pb::ListScansRequest { page_token: token, ..Default::default() }).await,
        Code::InvalidArgument,
        &["page_token"],
    );
    assert_status(
        client.list_scans(pb::ListScansRequest { state: 42, ..Default::default() }).await,
        Code::InvalidArgument,
        &["state"],
    );
}

#[tokio::test]
async fn results_page_in_scan_order_with_hostnames() {
    let (db, _c, mut client) = setup().await;
    let scan = client.create_scan(scan_req(&["localhost", "198.51.100.0/30"], "22,80,443")).await.unwrap().into_inner();
    // Ingest arrives with agent sessions; write rows the way it does.
    let mut conn = db.connect().await;
    sqlx::query(
        "INSERT INTO results (scan_id, position, ip, port, hostname, first_seen_at, last_seen_at)
         SELECT $1::uuid, u.pos, u.ip::inet, u.port, h.hostname, now(), now()
         FROM UNNEST($2::int8[], $3::text[], $4::int4[]) AS u(pos, ip, port)
         LEFT JOIN scan_hosts h ON h.scan_id = $1::uuid AND h.ip = u.ip::inet",
    )
    .bind(&scan.id)
    .bind(vec![9i64, 2, 14, 5, 0])
    .bind(vec!["198.51.100.2", "198.51.100.1", "127.0.0.1", "198.51.100.1", "198.51.100.3"])
    .bind(vec![80, 443, 22, 22, 80])
    .execute(&mut conn)
    .await
    .unwrap();
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_results(pb::ListResultsRequest {
                scan_id: scan.id.clone(),
                page_size: 2,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.results.len() <= 2);
        all.extend(page.results);
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let keys: Vec<(String, u32)> = all.iter().map(|r| (r.ip.clone(), r.port)).collect();
    assert_eq!(
        keys,
        [
            ("198.51.100.3".to_string(), 80),
            ("198.51.100.1".to_string(), 443),
            ("198.51.100.1".to_string(), 22),
            ("198.51.100.2".to_string(), 80),
            ("127.0.0.1".to_string(), 22),
        ]
    );
    assert_eq!(all[4].hostname, "localhost");
    assert_eq!(all[0].hostname, "");
    assert!(all.iter().all(|r| r.protocol == pb::Protocol::Tcp as i32 && r.state == pb::PortState::Open as i32));
}

#[tokio::test]
async fn database_outage_is_unavailable_then_recovers() {
    let db = TestDb::create().await;
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let mut options = db.options();
    options = options.host("127.0.0.1").port(proxy.addr().port());
    let mut config = portfleet_tests::controller_config(options);
    config.database.acquire_timeout = Duration::from_millis(500);
    let controller = TestController::start(config).await;
    let mut client = controller.client().await;
    client.create_scan(scan_req(&["198.51.100.1"], "80")).await.unwrap();

    proxy.cut();
    assert_status(client.create_scan(scan_req(&["198.51.100.2"], "80")).await, Code::Unavailable, &["database"]);
    assert_status(client.list_scans(pb::ListScansRequest::default()).await, Code::Unavailable, &["database"]);

    proxy.restore();
    let scans = eventually("the controller to recover", Duration::from_secs(20), || {
        let mut c = client.clone();
        async move { c.list_scans(pb::ListScansRequest::default()).await.ok() }
    })
    .await;
    assert_eq!(scans.into_inner().scans.len(), 1);
    client.create_scan(scan_req(&["198.51.100.3"], "80")).await.unwrap();
    controller.stop().await.unwrap();
}

#[tokio::test]
async fn controllers_starting_together_migrate_once_and_stop_cleanly() {
    let db = TestDb::create().await;
    let (a, b) = tokio::join!(
        TestController::start(portfleet_tests::controller_config(db.options())),
        TestController::start(portfleet_tests::controller_config(db.options())),
    );
    let scan = a.client().await.create_scan(scan_req(&["198.51.100.1"], "80")).await.unwrap().into_inner();
    let seen = b.client().await.get_scan(pb::GetScanRequest { id: scan.id.clone() }).await.unwrap().into_inner();
    assert_eq!(seen.id, scan.id);
    let started = std::time::Instant::now();
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test]
async fn a_controller_waiting_for_its_database_stops_on_request() {
    // Nothing listens on this proxy's upstream while it is cut.
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    proxy.cut();
    let options =
        sqlx::postgres::PgConnectOptions::new().host("127.0.0.1").port(proxy.addr().port()).username("postgres");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cancel = tokio_util::sync::CancellationToken::new();
    let run =
        tokio::spawn(portfleet_controller::run(portfleet_tests::controller_config(options), listener, cancel.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!run.is_finished(), "the controller should wait for its database");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(5), run).await.unwrap().unwrap().unwrap();
}

/// Text Postgres cannot store (NUL) or that forges log lines (CR, LF, ESC)
/// is refused as INVALID_ARGUMENT naming the field, wherever it enters
/// (it was INTERNAL: the insert failed); long values are echoed short.
#[tokio::test]
async fn control_characters_and_huge_values_are_invalid_arguments() {
    let (db, _c, mut client) = setup().await;
    for bad in ["a\0b", "forged\r\nERROR x", "\u{1b}[2J"] {
        let with = |f: &dyn Fn(&mut pb::CreateScanRequest)| {
            let mut r = scan_req(&["198.51.100.1"], "80");
            f(&mut r);
            r
        };
        let cases: Vec<(pb::CreateScanRequest, &str)> = vec![
            (with(&|r| r.labels = [("team".to_string(), bad.to_string())].into()), "labels"),
            (with(&|r| r.agent_selector = [("site".to_string(), bad.to_string())].into()), "agent_selector"),
            (with(&|r| r.request_id = bad.into()), "request_id"),
            (with(&|r| r.target_group = bad.into()), "target_group"),
            (with(&|r| r.targets = vec![bad.into()]), "targets[0]"),
        ];
        for (req, field) in cases {
            assert_status(client.create_scan(req).await, Code::InvalidArgument, &[field]);
        }
        assert_status(
            client.create_targets(pb::CreateTargetsRequest { targets: vec![target("198.51.100.1", bad, None)] }).await,
            Code::InvalidArgument,
            &["targets[0].group"],
        );
        assert_status(
            client.list_targets(pb::ListTargetsRequest { group: Some(bad.into()), ..Default::default() }).await,
            Code::InvalidArgument,
            &["group"],
        );
    }
    // A huge value is refused with a short message.
    let huge = format!("{}\n", "x".repeat(3_000_000));
    let status = client.create_scan(scan_req(&[huge.as_str()], "80")).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().len() < 500, "{} bytes", status.message().len());
    assert!(!status.message().chars().any(char::is_control), "{:?}", status.message());
    let scans: i64 = sqlx::query_scalar("SELECT count(*) FROM scans").fetch_one(&mut db.connect().await).await.unwrap();
    assert_eq!(scans, 0);
    // The controller is fine.
    client.create_scan(scan_req(&["198.51.100.1"], "80")).await.unwrap();
}
