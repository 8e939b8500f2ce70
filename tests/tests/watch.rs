//! WatchScan at scale against a real controller and Postgres: many watchers
//! of one scan, each of which must see every result exactly once whenever
//! it joins; idle watchers must not cost the database a query each; and the
//! caps per token and per controller. The agent is a test double speaking
//! the protocol over gRPC; nothing is probed.

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    time::Duration,
};

use portfleet_controller::{ControllerConfig, auth::Scope};
use portfleet_core::{AddressSet, PortSet, ScanSpace, permutation::Permutation};
use portfleet_proto::{
    auth::ApiClient,
    v1::{
        self as pb, agent_message::Frame as Out, agent_service_client::AgentServiceClient,
        controller_message::Frame as In, watch_scan_response::Event,
    },
};
use portfleet_tests::{TestController, TestDb, eventually};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

/// Short heartbeats and leases; shards of 2048 probes, so a small scan
/// has several; caps high enough for the tests that are not about them.
fn config(db: &TestDb) -> ControllerConfig {
    let mut c = portfleet_tests::controller_config(db.options());
    c.fleet.heartbeat_interval = Duration::from_millis(500);
    c.fleet.lease_ttl = Duration::from_secs(3);
    c.limits.shards.min_shard_probes = 2048;
    c.api.max_watches = 1000;
    c.api.max_watches_per_token = 1000;
    c
}

/// 256 addresses of TEST-NET-2 x 40 ports: 10,240 probes in 5 shards.
fn scan_request() -> pb::CreateScanRequest {
    pb::CreateScanRequest { targets: vec!["198.51.100.0/24".into()], ports: "1-40".into(), ..Default::default() }
}

/// An agent double: a session, heartbeats every 250 ms, and the frames the
/// controller sends it.
struct FakeAgent {
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: Streaming<pb::ControllerMessage>,
    heartbeats: tokio::task::JoinHandle<()>,
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

impl FakeAgent {
    async fn connect(c: &TestController, max_shards: u32) -> Self {
        let (tx, rx) = mpsc::channel(64);
        let hello = pb::Hello {
            agent_id: uuid::Uuid::new_v4().to_string(),
            name: "watch-test".into(),
            version: "test".into(),
            min_protocol_version: 1,
            max_protocol_version: 1,
            capabilities: Some(pb::Capabilities { raw_socket: true, ipv6: true }),
            max_shards,
            ..Default::default()
        };
        tx.send(pb::AgentMessage { frame: Some(Out::Hello(hello)) }).await.unwrap();
        let mut rx = AgentServiceClient::new(c.channel().await)
            .session(ReceiverStream::new(rx))
            .await
            .expect("session")
            .into_inner();
        match rx.message().await.unwrap().and_then(|m| m.frame) {
            Some(In::Welcome(_)) => {}
            other => panic!("expected Welcome, got {other:?}"),
        }
        let beat = tx.clone();
        let heartbeats = tokio::spawn(async move {
            loop {
                let m = pb::AgentMessage { frame: Some(Out::Heartbeat(pb::Heartbeat::default())) };
                if beat.send(m).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Self { tx, rx, heartbeats }
    }

    async fn send(&self, f: Out) {
        self.tx.send(pb::AgentMessage { frame: Some(f) }).await.unwrap();
    }

    /// The next frame that is not a heartbeat echo.
    async fn next(&mut self) -> In {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(10), self.rx.message())
                .await
                .expect("a frame within 10 s")
                .expect("stream alive")
                .expect("stream open");
            match m.frame {
                Some(In::Heartbeat(_)) | None => {}
                Some(f) => return f,
            }
        }
    }

    /// Sends `f` and waits for its Ack.
    async fn acked(&mut self, f: Out, shard: u64, seq: u64) {
        self.send(f).await;
        loop {
            match self.next().await {
                In::Ack(a) => return assert_eq!((a.shard_id, a.seq), (shard, seq), "ack of the frame sent"),
                // Upkeep cancels completed shards' leases, and the end of
                // the scan its last ones, sometimes before the Ack is out.
                In::Cancel(c) if c.reason.contains("(done)") || c.reason == "scan completed" => {}
                // Shares of the scan's rate move as leases come and go.
                In::Rate(_) => {}
                other => panic!("expected Ack, got {other:?}"),
            }
        }
    }
}

/// A leased shard as the double reports it: the open ports it will report,
/// in batches.
struct Lease {
    shard: u64,
    epoch: u64,
    seq: u64,
    batches: std::vec::IntoIter<Vec<pb::PortResult>>,
}

/// Every third position of the shard reports open, 37 results a batch
/// (two or three batches a shard, so per-shard cursors move several times).
fn plan_lease(a: &pb::Assign, expected: &mut BTreeSet<(String, u32)>) -> Lease {
    let p = a.scan.as_ref().expect("scan parameters");
    let space = ScanSpace::new(
        AddressSet::parse_ranges(&p.address_ranges).unwrap(),
        PortSet::parse(&p.ports).unwrap(),
        p.seed,
        Permutation::MAX_LEN,
    )
    .unwrap();
    let results: Vec<pb::PortResult> = (a.start_index..a.end_index)
        .step_by(3)
        .map(|pos| {
            let (ip, port) = space.probe_at(pos);
            assert!(expected.insert((ip.to_string(), u32::from(port))));
            let ip = match ip {
                IpAddr::V4(v4) => v4.octets().to_vec(),
                IpAddr::V6(v6) => v6.octets().to_vec(),
            };
            pb::PortResult { ip, port: u32::from(port), state: pb::PortState::Open as i32, ..Default::default() }
        })
        .collect();
    let batches: Vec<Vec<pb::PortResult>> = results.chunks(37).map(<[_]>::to_vec).collect();
    Lease { shard: a.shard_id, epoch: a.lease_epoch, seq: 0, batches: batches.into_iter() }
}

impl Lease {
    /// Reports the next batch; false when none is left.
    async fn report(&mut self, agent: &mut FakeAgent) -> bool {
        let Some(results) = self.batches.next() else { return false };
        self.seq += 1;
        let f = Out::Results(pb::ResultBatch {
            shard_id: self.shard,
            lease_epoch: self.epoch,
            seq: self.seq,
            results,
            trace_parent: None,
        });
        agent.acked(f, self.shard, self.seq).await;
        true
    }

    async fn complete(&mut self, agent: &mut FakeAgent) {
        self.seq += 1;
        let f = Out::Complete(pb::ShardComplete {
            shard_id: self.shard,
            lease_epoch: self.epoch,
            seq: self.seq,
            counts: None,
        });
        agent.acked(f, self.shard, self.seq).await;
    }
}

/// What one watcher saw: every result (duplicates kept, so they show) and
/// the last scan state, once its stream ended.
#[derive(Debug)]
struct Seen {
    results: Vec<(String, u32)>,
    last_state: i32,
    end: Result<(), tonic::Status>,
}

/// Opens a watch and follows it to the end on a task of its own; `ready`
/// gets a message once the first event (the scan snapshot) has arrived.
async fn spawn_watcher(
    mut client: ApiClient,
    id: String,
    ready: mpsc::UnboundedSender<()>,
) -> tokio::task::JoinHandle<Seen> {
    let mut stream = client.watch_scan(pb::WatchScanRequest { id }).await.expect("watch opened").into_inner();
    tokio::spawn(async move {
        let mut seen = Seen { results: Vec::new(), last_state: 0, end: Ok(()) };
        let mut first = true;
        loop {
            match stream.message().await {
                Ok(Some(m)) => match m.event {
                    Some(Event::Scan(s)) => seen.last_state = s.state,
                    Some(Event::Results(r)) => seen.results.extend(r.results.into_iter().map(|r| (r.ip, r.port))),
                    None => {}
                },
                Ok(None) => return seen,
                Err(e) => {
                    seen.end = Err(e);
                    return seen;
                }
            }
            if std::mem::take(&mut first) {
                let _ = ready.send(());
            }
        }
    })
}

/// `n` clients, each on its own connection (a connection carries at most
/// 128 streams).
async fn clients(c: &TestController, n: usize) -> Vec<ApiClient> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(c.client().await);
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hundreds_of_watchers_each_see_every_result_exactly_once() {
    many_watchers(portfleet_controller::config::ApiConfig::DEFAULT_WATCH_BACKLOG).await;
}

/// With a backlog of one step, watchers that are catching up or busy fall
/// behind their feed all the time and read their gaps from the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchers_that_fall_behind_read_their_gap_and_lose_nothing() {
    many_watchers(1).await;
}

/// 250 watchers of one scan: 100 from before its first result, 120 that
/// join while results land, 30 after it finished. Each must see exactly
/// the scan's results, each once, and end with the scan completed.
async fn many_watchers(backlog: usize) {
    let db = TestDb::create().await;
    let mut cfg = config(&db);
    cfg.api.watch_backlog = backlog;
    let c = TestController::start(cfg).await;
    let mut agent = FakeAgent::connect(&c, 8).await;
    let mut api = c.client().await;
    let scan = api.create_scan(scan_request()).await.unwrap().into_inner();
    assert_eq!(scan.shard_count, 5);
    let mut expected = BTreeSet::new();
    let mut leases = Vec::new();
    while leases.len() < 5 {
        match agent.next().await {
            In::Assign(a) => leases.push(plan_lease(&a, &mut expected)),
            other => panic!("expected Assign, got {other:?}"),
        }
    }
    let pool = clients(&c, 6).await;
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut watchers = Vec::new();

    // 100 watchers before any result.
    for i in 0..100 {
        watchers.push(spawn_watcher(pool[i % pool.len()].clone(), scan.id.clone(), ready_tx.clone()).await);
    }
    for _ in 0..100 {
        ready_rx.recv().await.unwrap();
    }

    // Results land shard after shard while 120 more watchers join in
    // between and alongside them.
    let joiners = {
        let (pool, id, ready) = (pool.clone(), scan.id.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let mut v = Vec::new();
            for i in 0..120 {
                v.push(spawn_watcher(pool[i % pool.len()].clone(), id.clone(), ready.clone()).await);
                if i % 10 == 9 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            v
        })
    };
    let mut more = true;
    while more {
        more = false;
        for lease in &mut leases {
            more |= lease.report(&mut agent).await;
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    watchers.extend(joiners.await.unwrap());
    for lease in &mut leases {
        lease.complete(&mut agent).await;
    }
    let done = api.get_scan(pb::GetScanRequest { id: scan.id.clone() }).await.unwrap().into_inner();
    assert_eq!(done.state, pb::ScanState::Completed as i32);
    assert_eq!(done.open_ports as usize, expected.len());

    // 30 watchers of the finished scan.
    for i in 0..30 {
        watchers.push(spawn_watcher(pool[i % pool.len()].clone(), scan.id.clone(), ready_tx.clone()).await);
    }
    assert_eq!(watchers.len(), 250);
    for (i, w) in watchers.into_iter().enumerate() {
        let seen = tokio::time::timeout(Duration::from_secs(30), w).await.expect("watch ended").unwrap();
        assert!(seen.end.is_ok(), "watcher {i} ended with {:?}", seen.end);
        assert_eq!(seen.last_state, pb::ScanState::Completed as i32, "watcher {i}");
        let unique: BTreeSet<(String, u32)> = seen.results.iter().cloned().collect();
        assert_eq!(seen.results.len(), unique.len(), "watcher {i} saw a result twice");
        let missing: Vec<_> = expected.difference(&unique).take(5).collect();
        let extra: Vec<_> = unique.difference(&expected).take(5).collect();
        assert!(
            missing.is_empty() && extra.is_empty(),
            "watcher {i} saw {} of {} results; missing e.g. {missing:?}, extra e.g. {extra:?}",
            unique.len(),
            expected.len()
        );
    }
}

/// Transactions committed in the test database so far (the statistics of
/// every backend, flushed at least once a second while it works).
async fn xacts(conn: &mut sqlx::PgConnection, db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT xact_commit FROM pg_stat_database WHERE datname = $1")
        .bind(db.name())
        .fetch_one(conn)
        .await
        .unwrap()
}

/// Commits in the test database over `window`.
async fn xacts_over(conn: &mut sqlx::PgConnection, db: &TestDb, window: Duration) -> i64 {
    let before = xacts(conn, db).await;
    tokio::time::sleep(window).await;
    xacts(conn, db).await - before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_watchers_share_one_database_reader() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let mut agent = FakeAgent::connect(&c, 8).await;
    let mut api = c.client().await;
    let scan = api.create_scan(scan_request()).await.unwrap().into_inner();
    let mut leases = Vec::new();
    let mut expected = BTreeSet::new();
    while leases.len() < 5 {
        if let In::Assign(a) = agent.next().await {
            leases.push(plan_lease(&a, &mut expected));
        }
    }
    // Some results, so a reader has cursors to follow; then the scan idles
    // (running, nothing new).
    leases[0].report(&mut agent).await;

    let pool = clients(&c, 4).await;
    let open = |n: usize| {
        let (pool, id) = (pool.clone(), scan.id.clone());
        async move {
            let mut streams = Vec::new();
            for i in 0..n {
                let mut client = pool[i % pool.len()].clone();
                let mut s = client.watch_scan(pb::WatchScanRequest { id: id.clone() }).await.unwrap().into_inner();
                let first = s.message().await.unwrap().unwrap();
                assert!(matches!(first.event, Some(Event::Scan(_))), "the snapshot comes first");
                streams.push(s);
            }
            streams
        }
    };
    let mut conn = db.connect().await;
    let window = Duration::from_secs(4);

    let one = open(1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let base = xacts_over(&mut conn, &db, window).await;

    let many = open(250).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let loaded = xacts_over(&mut conn, &db, window).await;

    // The agent's frames are still acked while the watchers are open.
    let started = std::time::Instant::now();
    leases[1].report(&mut agent).await;
    let ack = started.elapsed();

    eprintln!("commits over {window:?}: {base} with 1 watcher, {loaded} with 251; ack {ack:?}");
    // A watcher that polled on its own would cost a pass (two statements)
    // every 500 ms: 16 commits over the window each, 4000 for 250. One
    // reader for the scan costs the same however many watch it; the bound
    // (one commit per watcher per second) leaves room for the statistics'
    // lag: a backend idle after the watchers' GetScans flushes its counts
    // up to 10 s later, into the window.
    let extra = loaded - base;
    assert!(
        extra < 250 * window.as_secs() as i64,
        "250 idle watchers added {extra} commits over {window:?} ({base} with one): each watcher reads the database"
    );
    assert!(ack < Duration::from_secs(2), "an agent frame waited {ack:?} for its ack");
    drop((one, many));
}

#[tokio::test]
async fn watches_are_capped_per_token_and_per_controller() {
    let db = TestDb::create().await;
    let mut cfg = config(&db);
    cfg.api.max_watches = 5;
    cfg.api.max_watches_per_token = 3;
    let c = TestController::start(cfg).await;
    let mut api = c.client().await;
    // Pending forever: no agent.
    let scan = api.create_scan(scan_request()).await.unwrap().into_inner();
    let (a, b, cc) = (
        c.client().await,
        c.client_with(&c.new_token(Scope::Read).await).await,
        c.client_with(&c.new_token(Scope::Read).await).await,
    );
    let watch = |client: &ApiClient| {
        let (mut client, id) = (client.clone(), scan.id.clone());
        async move {
            let mut s = client.watch_scan(pb::WatchScanRequest { id }).await?.into_inner();
            s.message().await?;
            Ok::<_, tonic::Status>(s)
        }
    };
    // Which cap a refusal names: the token's or the controller's.
    let refused = |r: Result<Streaming<pb::WatchScanResponse>, tonic::Status>, per_token: bool| {
        let e = r.expect_err("refused over the cap");
        assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
        let names_token = e.message().contains("--max-watches-per-token");
        assert_eq!(names_token, per_token, "{:?}", e.message());
        assert!(e.message().contains("--max-watches"), "{:?}", e.message());
    };

    // Refused calls keep no slot.
    for _ in 0..5 {
        let unknown = pb::WatchScanRequest { id: uuid::Uuid::new_v4().to_string() };
        assert_eq!(a.clone().watch_scan(unknown).await.err().unwrap().code(), Code::NotFound);
    }

    let mut held: HashMap<&str, Vec<Streaming<pb::WatchScanResponse>>> = HashMap::new();
    for _ in 0..3 {
        held.entry("a").or_default().push(watch(&a).await.unwrap());
    }
    refused(watch(&a).await, true);
    for _ in 0..2 {
        held.entry("b").or_default().push(watch(&b).await.unwrap());
    }
    refused(watch(&cc).await, false);
    refused(watch(&b).await, false);

    // A watcher leaving frees its slot, for any token.
    drop(held.get_mut("a").unwrap().pop());
    let s = eventually("a slot freed", Duration::from_secs(10), || async { watch(&cc).await.ok() }).await;
    held.entry("c").or_default().push(s);
    refused(watch(&cc).await, false);
    drop(held.remove("c"));
    let s = eventually("a slot freed", Duration::from_secs(10), || async { watch(&a).await.ok() }).await;
    held.entry("a").or_default().push(s);
    refused(watch(&a).await, true);

    // Refused watches left nothing behind: once every stream is gone, the
    // whole controller cap is free again.
    drop(held);
    let mut again = Vec::new();
    for client in [&a, &b, &cc, &cc, &cc] {
        again.push(eventually("slots freed", Duration::from_secs(10), || async { watch(client).await.ok() }).await);
    }
    refused(watch(&b).await, false);
}

#[tokio::test]
async fn shutdown_ends_watches_with_unavailable() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let mut api = c.client().await;
    let scan = api.create_scan(scan_request()).await.unwrap().into_inner();
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut s = api.watch_scan(pb::WatchScanRequest { id: scan.id.clone() }).await.unwrap().into_inner();
        assert!(matches!(s.message().await.unwrap().unwrap().event, Some(Event::Scan(_))));
        streams.push(s);
    }
    let stopped = tokio::spawn(c.stop());
    for mut s in streams {
        let end = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match s.message().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        })
        .await
        .expect("the watch ended");
        let e = end.expect_err("ended with a status");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    }
    stopped.await.unwrap().unwrap();
}

/// API calls stuck in the database (here: behind a lock on `api_tokens`,
/// which every uncached token check reads) hold every connection of the
/// API pool, and only of it: the agent's frames are still committed and
/// acked at once on the fleet's pool.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_frames_keep_their_pool_while_api_calls_are_stuck() {
    let db = TestDb::create().await;
    let mut cfg = config(&db);
    cfg.api.db_pool_size = 2;
    let c = TestController::start(cfg).await;
    let mut agent = FakeAgent::connect(&c, 1).await;
    let mut api = c.client().await;
    let scan = api.create_scan(scan_request()).await.unwrap().into_inner();
    let mut expected = BTreeSet::new();
    let mut lease = match agent.next().await {
        In::Assign(a) => plan_lease(&a, &mut expected),
        other => panic!("expected Assign, got {other:?}"),
    };
    // More callers than both pools have connections, each with a token the
    // controller has not seen (so not cached).
    let mut callers = Vec::new();
    for _ in 0..24 {
        callers.push(c.client_with(&c.new_token(Scope::Read).await).await);
    }
    let mut conn = db.connect().await;
    let mut lock = sqlx::Connection::begin(&mut conn).await.unwrap();
    sqlx::query("LOCK TABLE api_tokens IN ACCESS EXCLUSIVE MODE").execute(&mut *lock).await.unwrap();
    let calls: Vec<_> = callers
        .into_iter()
        .map(|mut client| {
            let id = scan.id.clone();
            tokio::spawn(async move { client.get_scan(pb::GetScanRequest { id }).await.map(drop) })
        })
        .collect();
    let name = db.name().to_string();
    eventually("API calls waiting on the lock", Duration::from_secs(10), || {
        let (url, name) = (db.url().to_string(), name.clone());
        async move {
            let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&url).await.ok()?;
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND wait_event_type = 'Lock'",
            )
            .bind(name)
            .fetch_one(&mut conn)
            .await
            .ok()?;
            (waiting >= 2).then_some(())
        }
    })
    .await;

    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(2), lease.report(&mut agent))
        .await
        .expect("the agent's batch was acked while the API calls were stuck");
    let ack = started.elapsed();
    assert!(calls.iter().all(|c| !c.is_finished()), "the API calls were still stuck");
    lock.rollback().await.unwrap();
    for call in calls {
        // Done or refused (UNAVAILABLE after the acquire timeout); never hung.
        let _ = tokio::time::timeout(Duration::from_secs(10), call).await.expect("call ended");
    }
    eprintln!("ack after {ack:?} with the API pool stuck");
}
