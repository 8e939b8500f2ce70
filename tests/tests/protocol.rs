//! The agent protocol from the wire: a hand-rolled agent sends bad frames
//! to a real controller, and each is refused as docs/protocol.md says,
//! while the session and the controller carry on.

use std::time::Duration;

use portfleet_controller::ControllerConfig;
use portfleet_proto::v1::{
    self as pb, agent_message::Frame as Out, agent_service_client::AgentServiceClient, controller_message::Frame as In,
};
use portfleet_tests::{TestController, TestDb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};

struct FakeAgent {
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: Streaming<pb::ControllerMessage>,
}

fn hello(id: &str, min: u32, max: u32) -> pb::AgentMessage {
    pb::AgentMessage {
        frame: Some(Out::Hello(pb::Hello {
            agent_id: id.into(),
            name: "fake".into(),
            version: "test".into(),
            min_protocol_version: min,
            max_protocol_version: max,
            capabilities: Some(pb::Capabilities { raw_socket: true, ipv6: true }),
            max_shards: 1,
            ..Default::default()
        })),
    }
}

async fn open(c: &TestController, first: Option<pb::AgentMessage>) -> Result<FakeAgent, tonic::Status> {
    let (tx, rx) = mpsc::channel(16);
    if let Some(m) = first {
        tx.send(m).await.unwrap();
    }
    let mut client = AgentServiceClient::new(c.channel().await);
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    // The first answer: Welcome, or the status that ends the stream.
    let first = inbound.message().await?;
    match first.and_then(|m| m.frame) {
        Some(In::Welcome(_)) => Ok(FakeAgent { tx, rx: inbound }),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

impl FakeAgent {
    async fn send(&self, f: Out) {
        self.tx.send(pb::AgentMessage { frame: Some(f) }).await.unwrap();
    }

    /// The next frame that is not a heartbeat.
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

    /// Whether the controller ended this stream (checked without waiting
    /// long).
    async fn rx_closed(&mut self) -> bool {
        loop {
            match tokio::time::timeout(Duration::from_millis(5), self.rx.message()).await {
                Err(_) => return false,
                Ok(Ok(Some(_))) => continue,
                Ok(_) => return true,
            }
        }
    }

    async fn beat(&self) {
        self.send(Out::Heartbeat(pb::Heartbeat::default())).await;
    }
}

fn result(ip: [u8; 4], port: u32) -> pb::PortResult {
    pb::PortResult { ip: ip.to_vec(), port, state: pb::PortState::Open as i32, ..Default::default() }
}

fn batch(shard: u64, epoch: u64, seq: u64, results: Vec<pb::PortResult>) -> Out {
    Out::Results(pb::ResultBatch { shard_id: shard, lease_epoch: epoch, seq, results, trace_parent: None })
}

#[track_caller]
fn refused(f: In, reason: pb::RefusalReason) {
    match f {
        In::Refused(r) => assert_eq!(r.reason, reason as i32, "{r:?}"),
        other => panic!("expected a refusal ({reason:?}), got {other:?}"),
    }
}

/// Four probes of TEST-NET-2: the agents here are test doubles that never
/// send a packet.
fn small_scan() -> pb::CreateScanRequest {
    pb::CreateScanRequest { targets: vec!["198.51.100.0/30".into()], ports: "80".into(), ..Default::default() }
}

fn config(db: &TestDb) -> ControllerConfig {
    let mut c = portfleet_tests::controller_config(db.options());
    c.fleet.hello_timeout = Duration::from_millis(500);
    c.fleet.heartbeat_interval = Duration::from_millis(500);
    c.fleet.lease_ttl = Duration::from_secs(3);
    c
}

#[tokio::test]
async fn handshakes_are_refused_with_documented_statuses() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let id = uuid::Uuid::new_v4().to_string();
    let code = |r: Result<FakeAgent, tonic::Status>| r.err().expect("refused").code();
    assert_eq!(code(open(&c, None).await), Code::DeadlineExceeded, "no Hello in time");
    assert_eq!(code(open(&c, Some(hello(&id, 7, 9))).await), Code::FailedPrecondition, "no common version");
    assert_eq!(code(open(&c, Some(hello("not-a-uuid", 1, 1))).await), Code::InvalidArgument);
    let heartbeat_first = pb::AgentMessage { frame: Some(Out::Heartbeat(pb::Heartbeat::default())) };
    assert_eq!(code(open(&c, Some(heartbeat_first)).await), Code::InvalidArgument, "first frame not Hello");
    // The controller is fine afterwards.
    assert!(open(&c, Some(hello(&id, 1, 3))).await.is_ok());
}

#[tokio::test]
async fn bad_frames_are_refused_and_the_session_survives() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let id = uuid::Uuid::new_v4().to_string();
    let mut agent = open(&c, Some(hello(&id, 1, 1))).await.unwrap();
    let mut api = c.client().await;
    // Nothing probes: this agent is a test double that never sends a packet.
    let scan = api.create_scan(small_scan()).await.unwrap().into_inner();
    let In::Assign(first) = agent.next().await else { panic!("expected Assign") };
    assert_eq!(first.scan.as_ref().unwrap().total, 4);
    let (shard, e1) = (first.shard_id, first.lease_epoch);

    // Hand it back and get it again: the first epoch is now stale.
    agent.send(Out::Released(pb::ShardReleased { shard_id: shard, lease_epoch: e1, agent_leaving: false })).await;
    let In::Assign(second) = agent.next().await else { panic!("expected a second Assign") };
    assert_eq!(second.shard_id, shard);
    let e2 = second.lease_epoch;
    assert!(e2 > e1);

    agent.send(batch(shard, e1, 1, vec![result([198, 51, 100, 1], 80)])).await;
    refused(agent.next().await, pb::RefusalReason::StaleEpoch);
    agent.send(batch(shard + 1000, e2, 1, vec![result([198, 51, 100, 1], 80)])).await;
    refused(agent.next().await, pb::RefusalReason::UnknownShard);
    agent.send(batch(shard, e2, 1, (0..5001).map(|_| result([198, 51, 100, 1], 80)).collect())).await;
    refused(agent.next().await, pb::RefusalReason::BatchTooLarge);
    agent.send(batch(shard, e2, 5, vec![result([198, 51, 100, 1], 80)])).await;
    refused(agent.next().await, pb::RefusalReason::OutOfOrder);
    let five_byte_ip = pb::PortResult { ip: vec![198, 51, 100, 1, 9], ..result([0; 4], 80) };
    agent.send(batch(shard, e2, 1, vec![five_byte_ip])).await;
    refused(agent.next().await, pb::RefusalReason::Invalid);
    agent.beat().await;

    // A good batch is acked after commit; its resend is acked again and
    // writes nothing twice.
    for _ in 0..2 {
        agent.send(batch(shard, e2, 1, vec![result([198, 51, 100, 1], 80)])).await;
        match agent.next().await {
            In::Ack(a) => assert_eq!((a.shard_id, a.lease_epoch, a.seq), (shard, e2, 1)),
            other => panic!("expected Ack, got {other:?}"),
        }
    }
    agent
        .send(Out::Progress(pb::Progress { shard_id: shard, lease_epoch: e2, seq: 2, checkpoint: 2, counts: None }))
        .await;
    assert!(matches!(agent.next().await, In::Ack(a) if a.seq == 2));
    agent.send(Out::Complete(pb::ShardComplete { shard_id: shard, lease_epoch: e2, seq: 3, counts: None })).await;
    assert!(matches!(agent.next().await, In::Ack(a) if a.seq == 3));
    let done = api.get_scan(pb::GetScanRequest { id: scan.id.clone() }).await.unwrap().into_inner();
    assert_eq!(done.state, pb::ScanState::Completed as i32);
    assert_eq!(done.open_ports, 1);
    let mut conn = db.connect().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM results").fetch_one(&mut conn).await.unwrap();
    assert_eq!(rows, 1);
    let agents = api.list_agents(pb::ListAgentsRequest::default()).await.unwrap().into_inner().agents;
    assert_eq!(agents[0].state, pb::AgentState::Connected as i32, "the session survived every refusal");
}

#[tokio::test]
async fn a_silent_agent_loses_its_session_and_its_lease() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let id = uuid::Uuid::new_v4().to_string();
    let mut agent = open(&c, Some(hello(&id, 1, 1))).await.unwrap();
    let mut api = c.client().await;
    api.create_scan(small_scan()).await.unwrap();
    assert!(matches!(agent.next().await, In::Assign(_)));
    // No heartbeats: the controller ends the session after the lease TTL.
    let end = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match agent.rx.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return None,
                Err(status) => return Some(status.code()),
            }
        }
    })
    .await
    .expect("the session ended");
    assert_eq!(end, Some(Code::DeadlineExceeded));
    let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
    portfleet_tests::eventually("the lease to lapse", Duration::from_secs(15), || {
        let pool = pool.clone();
        async move {
            let state: String = sqlx::query_scalar("SELECT state FROM shards LIMIT 1").fetch_one(&pool).await.ok()?;
            (state == "pending").then_some(())
        }
    })
    .await;
}

fn hello_with(id: &str, labels: &[(&str, &str)], raw_socket: bool) -> pb::AgentMessage {
    let mut m = hello(id, 1, 1);
    if let Some(Out::Hello(h)) = &mut m.frame {
        h.labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        h.capabilities = Some(pb::Capabilities { raw_socket, ipv6: true });
    }
    m
}

/// No Assign arrives within `wait`.
async fn no_assign(agent: &mut FakeAgent, wait: Duration) {
    let got = tokio::time::timeout(wait, async {
        loop {
            match agent.rx.message().await {
                Ok(Some(pb::ControllerMessage { frame: Some(In::Assign(a)) })) => return a,
                Ok(Some(_)) => {}
                other => panic!("stream ended: {other:?}"),
            }
        }
    })
    .await;
    assert!(got.is_err(), "unexpected Assign: {got:?}");
}

#[tokio::test]
async fn a_scan_s_rate_is_split_across_its_leases() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let mut a = open(&c, Some(hello(&uuid::Uuid::new_v4().to_string(), 1, 1))).await.unwrap();
    let mut api = c.client().await;
    // Two shards (the minimum shard is 16384 probes).
    api.create_scan(pb::CreateScanRequest {
        targets: vec!["198.51.100.0/24".into()],
        ports: "1-200".into(),
        rate: 1000,
        ..Default::default()
    })
    .await
    .unwrap();
    let In::Assign(first) = a.next().await else { panic!("expected Assign") };
    assert_eq!(first.rate, 1000, "alone on the scan: all of its rate");
    let mut b = open(&c, Some(hello(&uuid::Uuid::new_v4().to_string(), 1, 1))).await.unwrap();
    let In::Assign(second) = b.next().await else { panic!("expected Assign") };
    assert_eq!(second.rate, 500);
    match a.next().await {
        In::Rate(r) => assert_eq!((r.shard_id, r.rate), (first.shard_id, 500)),
        other => panic!("expected RateUpdate, got {other:?}"),
    }
}

#[tokio::test]
async fn labels_and_capabilities_decide_placement() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let mut eu =
        open(&c, Some(hello_with(&uuid::Uuid::new_v4().to_string(), &[("region", "eu")], false))).await.unwrap();
    let mut api = c.client().await;
    let us_only = api
        .create_scan(pb::CreateScanRequest {
            targets: vec!["198.51.100.1".into()],
            ports: "80".into(),
            scan_type: pb::ScanType::Connect as i32,
            agent_selector: [("region".to_string(), "us".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    no_assign(&mut eu, Duration::from_secs(1)).await;
    let waiting = portfleet_tests::eventually("a waiting reason", Duration::from_secs(10), || {
        let mut api = api.clone();
        let id = us_only.id.clone();
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (!s.waiting_reason.is_empty()).then_some(s.waiting_reason)
        }
    })
    .await;
    assert!(waiting.contains("labels"), "{waiting}");
    // A SYN scan that allows the fallback runs as a connect scan here.
    api.create_scan(pb::CreateScanRequest {
        targets: vec!["198.51.100.4".into()],
        ports: "80".into(),
        allow_connect_fallback: true,
        ..Default::default()
    })
    .await
    .unwrap();
    let In::Assign(a) = eu.next().await else { panic!("expected Assign") };
    assert_eq!(a.scan.unwrap().scan_type, pb::ScanType::Connect as i32);
}

#[tokio::test]
async fn a_drained_agent_gets_no_new_work() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let id = uuid::Uuid::new_v4().to_string();
    let mut agent = open(&c, Some(hello(&id, 1, 1))).await.unwrap();
    let mut api = c.client().await;
    let drained = api.drain_agent(pb::DrainAgentRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(drained.state, pb::AgentState::Draining as i32);
    assert!(matches!(agent.next().await, In::Drain(_)));
    api.create_scan(pb::CreateScanRequest {
        targets: vec!["198.51.100.1".into()],
        ports: "80".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    agent.beat().await;
    no_assign(&mut agent, Duration::from_secs(1)).await;
    let unknown = uuid::Uuid::new_v4().to_string();
    let err = api.drain_agent(pb::DrainAgentRequest { id: unknown }).await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[tokio::test]
async fn a_shard_that_keeps_failing_fails_its_scan() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let mut agent = open(&c, Some(hello(&uuid::Uuid::new_v4().to_string(), 1, 1))).await.unwrap();
    let mut api = c.client().await;
    let scan = api
        .create_scan(pb::CreateScanRequest {
            targets: vec!["198.51.100.1".into()],
            ports: "80".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Three failures are retried; the fourth fails the scan.
    for _ in 0..4 {
        let In::Assign(a) = agent.next().await else { panic!("expected Assign") };
        agent
            .send(Out::Failed(pb::ShardFailed {
                shard_id: a.shard_id,
                lease_epoch: a.lease_epoch,
                reason: "interface went away".into(),
            }))
            .await;
    }
    let failed = failed_scan(&api, &scan.id).await;
    assert!(failed.error.contains("interface went away"), "{}", failed.error);
    assert!(failed.error.contains("4 times"), "{}", failed.error);
}

/// Fuzzes the controller's frame handling over the wire: thousands of
/// random frames - real and bogus shard ids and epochs, ids past i64,
/// out-of-order and zero sequence numbers, addresses of every length,
/// ports past 65535, checkpoints past the range, a second Hello - from an
/// agent holding a real lease. Whatever happens to that session, the
/// controller keeps serving, never stores a result outside the scan, and a
/// new agent still gets work. `PORTFLEET_FUZZ_FRAMES` runs more.
#[tokio::test]
async fn random_frames_never_break_the_controller() {
    use rand::{Rng, seq::IndexedRandom};
    let frames: usize = std::env::var("PORTFLEET_FUZZ_FRAMES").ok().and_then(|v| v.parse().ok()).unwrap_or(1500);
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let mut api = c.client().await;
    let scan = api.create_scan(small_scan()).await.unwrap().into_inner();
    let id = uuid::Uuid::new_v4().to_string();
    let mut agent = open(&c, Some(hello(&id, 1, 1))).await.unwrap();
    let In::Assign(a) = agent.next().await else { panic!("expected Assign") };
    let mut rng = rand::rng();
    let u64s = |rng: &mut rand::rngs::ThreadRng, real: u64| -> u64 {
        *[real, real + 1, 0, 1, rng.random(), u64::MAX, i64::MAX as u64 + 1].choose(rng).unwrap()
    };
    let mut reopened = 0;
    for i in 0..frames {
        let (shard, epoch, seq) = (u64s(&mut rng, a.shard_id), u64s(&mut rng, a.lease_epoch), u64s(&mut rng, 1));
        let results = (0..rng.random_range(0..4))
            .map(|_| pb::PortResult {
                ip: (0..*[0usize, 3, 4, 5, 16, 17].choose(&mut rng).unwrap()).map(|_| rng.random()).collect(),
                port: *[80, 0, 65535, 65536, u32::MAX, rng.random()].choose(&mut rng).unwrap(),
                state: rng.random_range(-1..4),
                observed_at: rng
                    .random_bool(0.5)
                    .then(|| prost_types::Timestamp { seconds: rng.random(), nanos: rng.random() }),
                service: rng.random_bool(0.3).then(|| pb::Service {
                    name: "\u{1b}x".repeat(rng.random_range(0..5000)),
                    confidence: rng.random(),
                    http: vec![pb::HttpInfo { status: rng.random(), ..Default::default() }; rng.random_range(0..40)],
                    ..Default::default()
                }),
                host_answers_everything: rng.random(),
            })
            .collect();
        let counts = rng.random_bool(0.5).then(|| pb::ShardCounts {
            sent: rng.random(),
            open: rng.random(),
            closed: rng.random(),
            filtered: rng.random(),
        });
        let text: String = (0..rng.random_range(0..300)).map(|_| rng.random::<char>()).collect();
        let frame = match rng.random_range(0..8) {
            0 => {
                Out::Results(pb::ResultBatch { shard_id: shard, lease_epoch: epoch, seq, results, trace_parent: None })
            }
            1 => Out::Progress(pb::Progress {
                shard_id: shard,
                lease_epoch: epoch,
                seq,
                checkpoint: rng.random(),
                counts,
            }),
            2 => Out::Complete(pb::ShardComplete { shard_id: shard, lease_epoch: epoch, seq, counts }),
            3 => Out::Failed(pb::ShardFailed { shard_id: shard, lease_epoch: epoch, reason: text }),
            4 => Out::Released(pb::ShardReleased { shard_id: shard, lease_epoch: epoch, agent_leaving: rng.random() }),
            5 => match hello(&id, 1, 1).frame {
                Some(Out::Hello(mut h)) => {
                    h.name = text;
                    Out::Hello(h)
                }
                _ => unreachable!(),
            },
            _ => Out::Heartbeat(pb::Heartbeat::default()),
        };
        // A session the controller ended (legitimately) is reopened.
        if agent.tx.send(pb::AgentMessage { frame: Some(frame) }).await.is_err()
            || i % 50 == 0 && agent.rx_closed().await
        {
            reopened += 1;
            agent = open(&c, Some(hello(&uuid::Uuid::new_v4().to_string(), 1, 1))).await.unwrap();
        }
    }
    // Still serving: health, a new agent gets the scan's work (or it is
    // already over), and no stored result lies outside the scan.
    let fresh = open(&c, Some(hello(&uuid::Uuid::new_v4().to_string(), 1, 1))).await;
    assert!(fresh.is_ok(), "a new session after {frames} random frames ({reopened} reopened)");
    let got = api.get_scan(pb::GetScanRequest { id: scan.id.clone() }).await.unwrap().into_inner();
    let results = api
        .list_results(pb::ListResultsRequest { scan_id: scan.id, ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .results;
    assert!(results.len() <= 4, "{} results for a 4-probe scan", results.len());
    for r in &results {
        assert!(r.ip.starts_with("198.51.100.") && r.port == 80, "{r:?}");
    }
    assert!(got.probes_done <= got.probes_planned, "{got:?}");
}

/// A session holding one shard may write results only inside that shard:
/// a position elsewhere in the scan is refused and nothing is written (it
/// would otherwise take the place of the real agent's result there).
#[tokio::test]
async fn results_outside_the_lease_are_refused_and_not_written() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let mut agent = open(&c, Some(hello(&uuid::Uuid::new_v4().to_string(), 1, 1))).await.unwrap();
    let mut api = c.client().await;
    // Four shards of TEST-NET-2 (never probed: the agent is a test double).
    api.create_scan(pb::CreateScanRequest {
        targets: vec!["198.51.100.0/24".into()],
        ports: "1-256".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let In::Assign(a) = agent.next().await else { panic!("expected Assign") };
    let space = portfleet_tests::fake_agent::space_of(&a);
    assert!(a.end_index - a.start_index < space.len(), "one shard is not the whole scan");
    let as_result = |pos: u64| {
        let (ip, port) = space.probe_at(pos);
        let std::net::IpAddr::V4(v4) = ip else { panic!("IPv4 scan") };
        result(v4.octets(), u32::from(port))
    };
    let outside = if a.end_index < space.len() { a.end_index } else { a.start_index - 1 };
    // One result inside, one outside: the whole frame is refused.
    agent.send(batch(a.shard_id, a.lease_epoch, 1, vec![as_result(a.start_index), as_result(outside)])).await;
    match agent.next().await {
        In::Refused(r) => {
            assert_eq!(r.reason, pb::RefusalReason::Invalid as i32, "{r:?}");
            assert!(r.message.contains("outside the lease"), "{}", r.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM results").fetch_one(&mut db.connect().await).await.unwrap();
    assert_eq!(rows, 0, "nothing of a refused frame is written");
    // The lease goes on: an in-range batch with the same seq is applied.
    agent.send(batch(a.shard_id, a.lease_epoch, 1, vec![as_result(a.start_index)])).await;
    assert!(matches!(agent.next().await, In::Ack(ack) if ack.seq == 1));
}

/// Text Postgres cannot store, or that would forge log lines, is refused
/// in the handshake as INVALID_ARGUMENT (it was INTERNAL: the insert
/// failed), and the controller carries on.
#[tokio::test]
async fn control_characters_in_a_hello_are_invalid_arguments() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let code = |r: Result<FakeAgent, tonic::Status>| r.err().expect("refused").code();
    let id = uuid::Uuid::new_v4().to_string();
    for bad in ["nul\0name", "forged\nERROR line", "\u{1b}[2Jclear"] {
        let mut m = hello(&id, 1, 1);
        if let Some(Out::Hello(h)) = &mut m.frame {
            h.name = bad.into();
        }
        assert_eq!(code(open(&c, Some(m)).await), Code::InvalidArgument, "name {bad:?}");
        let mut m = hello_with(&id, &[("site", bad)], true);
        if let Some(Out::Hello(h)) = &mut m.frame {
            h.version = "1".into();
        }
        assert_eq!(code(open(&c, Some(m)).await), Code::InvalidArgument, "label {bad:?}");
        let mut m = hello(&id, 1, 1);
        if let Some(Out::Hello(h)) = &mut m.frame {
            h.version = bad.into();
        }
        assert_eq!(code(open(&c, Some(m)).await), Code::InvalidArgument, "version {bad:?}");
    }
    assert!(open(&c, Some(hello(&id, 1, 1))).await.is_ok());
}

/// The scan's waiting reason, once `ok` holds for it (upkeep explains
/// waiting scans once a second).
async fn reason_once(api: &portfleet_proto::auth::ApiClient, id: &str, ok: impl Fn(&pb::Scan) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let scan = api.clone().get_scan(pb::GetScanRequest { id: id.into() }).await.unwrap().into_inner();
        if ok(&scan) {
            return scan.waiting_reason;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out; the scan is {scan:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn one_host(last: u8) -> pb::CreateScanRequest {
    pb::CreateScanRequest { targets: vec![format!("198.51.100.{last}")], ports: "80".into(), ..Default::default() }
}

/// Keeps a fake agent's session alive while a test takes longer than the
/// lease TTL.
fn keep_beating(agent: &FakeAgent) -> tokio::task::JoinHandle<()> {
    let tx = agent.tx.clone();
    tokio::spawn(async move {
        let beat = || pb::AgentMessage { frame: Some(Out::Heartbeat(pb::Heartbeat::default())) };
        while tx.send(beat()).await.is_ok() {
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    })
}

/// Every pending scan says why it waits - no agent, every able agent busy,
/// none matching its selector, all draining - with counts, and the reason
/// follows its cause until the scan starts, when it is cleared.
#[tokio::test]
async fn every_waiting_scan_says_why_and_the_reason_follows_its_cause() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let mut api = c.client().await;
    let first = api.create_scan(one_host(1)).await.unwrap().into_inner();
    let reason = reason_once(&api, &first.id, |s| !s.waiting_reason.is_empty()).await;
    assert_eq!(reason, "no agent is connected");

    // One agent with room for one shard takes it: the reason goes.
    let mut agent = open(&c, Some(hello(&uuid::Uuid::new_v4().to_string(), 1, 1))).await.unwrap();
    let _beats = keep_beating(&agent);
    assert!(matches!(agent.next().await, In::Assign(_)));
    reason_once(&api, &first.id, |s| s.state == pb::ScanState::Running as i32 && s.waiting_reason.is_empty()).await;

    // Queued behind it: busy, not silent.
    let queued = api.create_scan(one_host(2)).await.unwrap().into_inner();
    let reason = reason_once(&api, &queued.id, |s| !s.waiting_reason.is_empty()).await;
    assert_eq!(reason, "every agent that can run this scan is busy: 1 at its shard limit");
    let mut eu = one_host(3);
    eu.agent_selector = [("site".to_string(), "eu".to_string())].into();
    let eu = api.create_scan(eu).await.unwrap().into_inner();
    let reason = reason_once(&api, &eu.id, |s| !s.waiting_reason.is_empty()).await;
    assert_eq!(reason, "no connected agent can run this scan: 1 without the agent_selector labels {site=eu}");

    // The first scan over: the queued one starts, its reason cleared.
    api.cancel_scan(pb::CancelScanRequest { id: first.id.clone() }).await.unwrap();
    loop {
        match agent.next().await {
            In::Cancel(_) => {}
            In::Assign(a) => {
                assert_eq!(a.scan.unwrap().scan_id, queued.id);
                break;
            }
            other => panic!("expected Cancel, then Assign: {other:?}"),
        }
    }
    reason_once(&api, &queued.id, |s| s.state == pb::ScanState::Running as i32 && s.waiting_reason.is_empty()).await;

    // Draining: the cause changes, and so does the reason.
    let id = agent_id_of(&mut api).await;
    api.drain_agent(pb::DrainAgentRequest { id }).await.unwrap();
    let reason = reason_once(&api, &eu.id, |s| s.waiting_reason.contains("draining")).await;
    assert_eq!(reason, "no connected agent can run this scan: 1 draining");
    let later = api.create_scan(one_host(4)).await.unwrap().into_inner();
    let reason = reason_once(&api, &later.id, |s| !s.waiting_reason.is_empty()).await;
    assert_eq!(reason, "no connected agent can run this scan: 1 draining");
}

/// The scan once it has failed (within 10 s).
async fn failed_scan(api: &portfleet_proto::auth::ApiClient, id: &str) -> pb::Scan {
    portfleet_tests::eventually("the scan to fail", Duration::from_secs(10), || {
        let mut api = api.clone();
        let id = id.to_string();
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (s.state == pb::ScanState::Failed as i32).then_some(s)
        }
    })
    .await
}

async fn agent_id_of(api: &mut portfleet_proto::auth::ApiClient) -> String {
    let agents = api.list_agents(pb::ListAgentsRequest::default()).await.unwrap().into_inner().agents;
    assert_eq!(agents.len(), 1);
    agents[0].id.clone()
}

/// A shard the agent's own scope policy refuses (`portfleet-agent run
/// --allow/--deny`) fails its scan at once, naming the agent and its
/// reason: every retry would be refused the same way.
#[tokio::test]
async fn a_shard_the_agent_s_policy_refuses_fails_its_scan_at_once() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let mut agent = open(&c, Some(hello(&uuid::Uuid::new_v4().to_string(), 1, 1))).await.unwrap();
    let mut api = c.client().await;
    let scan = api.create_scan(one_host(1)).await.unwrap().into_inner();
    let In::Assign(a) = agent.next().await else { panic!("expected Assign") };
    // What portfleet-agent says (agent/src/session/shard.rs, `Refusal`).
    let reason = "refused by the agent's scope policy: 198.51.100.1 is outside its --allow/--deny";
    agent
        .send(Out::Failed(pb::ShardFailed { shard_id: a.shard_id, lease_epoch: a.lease_epoch, reason: reason.into() }))
        .await;
    let failed = failed_scan(&api, &scan.id).await;
    assert_eq!(
        failed.error,
        format!(
            "agent fake refused shard {} by its own scope policy: 198.51.100.1 is outside its --allow/--deny",
            a.shard_id
        )
    );
    let leases: i64 =
        sqlx::query_scalar("SELECT count(*) FROM shard_leases").fetch_one(&mut db.connect().await).await.unwrap();
    assert_eq!(leases, 1, "the refused shard was not leased again");
    no_assign(&mut agent, Duration::from_millis(500)).await;
}

/// Two processes with one agent id: the live session keeps its place and
/// the newcomer is refused (ALREADY_EXISTS) naming it, rather than the two
/// knocking each other off forever. A dead session gives way: at once when
/// its stream closed (the agent crashed), within the lease TTL when it is
/// half-open (silent).
#[tokio::test]
async fn a_second_session_of_a_live_agent_is_refused_and_the_first_keeps_its_place() {
    let db = TestDb::create().await;
    let c = TestController::start(config(&db)).await;
    let id = uuid::Uuid::new_v4().to_string();
    let mut first = open(&c, Some(hello(&id, 1, 1))).await.unwrap();
    for _ in 0..3 {
        let err = open(&c, Some(hello(&id, 1, 1))).await.err().expect("the second session is refused");
        assert_eq!(err.code(), Code::AlreadyExists, "{err:?}");
        let live = format!("agent {id} (fake) already has a live session from 127.0.0.1:");
        assert!(err.message().contains(&live), "{}", err.message());
        first.beat().await;
    }
    // The first was never disturbed: same session, and it gets work.
    let mut api = c.client().await;
    api.create_scan(small_scan()).await.unwrap();
    assert!(matches!(first.next().await, In::Assign(_)));
    assert!(!first.rx_closed().await);
    let mut conn = db.connect().await;
    let generation: i64 =
        sqlx::query_scalar("SELECT session_generation FROM agents").fetch_one(&mut conn).await.unwrap();
    assert_eq!(generation, 1);

    // Crashed: its stream closes, and the restarted agent gets in at once.
    drop(first);
    let restarted = std::time::Instant::now();
    let _second = portfleet_tests::eventually("the restarted agent's session", Duration::from_secs(5), || {
        let (c, id) = (&c, id.clone());
        async move { open(c, Some(hello(&id, 1, 1))).await.ok() }
    })
    .await;
    assert!(restarted.elapsed() < Duration::from_secs(2), "{:?}", restarted.elapsed());

    // Half-open: silent, its stream still open. It gives way within the
    // lease TTL (3 s here).
    let silent = std::time::Instant::now();
    let _third = portfleet_tests::eventually("a session after the silent one", Duration::from_secs(10), || {
        let (c, id) = (&c, id.clone());
        async move { open(c, Some(hello(&id, 1, 1))).await.ok() }
    })
    .await;
    assert!(silent.elapsed() < Duration::from_secs(6), "{:?}", silent.elapsed());
}
