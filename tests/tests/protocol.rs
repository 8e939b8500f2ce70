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

    async fn beat(&self) {
        self.send(Out::Heartbeat(pb::Heartbeat::default())).await;
    }
}

fn result(ip: [u8; 4], port: u32) -> pb::PortResult {
    pb::PortResult { ip: ip.to_vec(), port, state: pb::PortState::Open as i32, observed_at: None }
}

fn batch(shard: u64, epoch: u64, seq: u64, results: Vec<pb::PortResult>) -> Out {
    Out::Results(pb::ResultBatch { shard_id: shard, lease_epoch: epoch, seq, results })
}

#[track_caller]
fn refused(f: In, reason: pb::RefusalReason) {
    match f {
        In::Refused(r) => assert_eq!(r.reason, reason as i32, "{r:?}"),
        other => panic!("expected a refusal ({reason:?}), got {other:?}"),
    }
}

fn config(db: &TestDb) -> ControllerConfig {
    let mut c = ControllerConfig::new(db.options());
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
    let scan = api
        .create_scan(pb::CreateScanRequest {
            targets: vec!["192.0.2.0/30".into()],
            ports: "80".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let In::Assign(first) = agent.next().await else { panic!("expected Assign") };
    assert_eq!(first.scan.as_ref().unwrap().total, 4);
    let (shard, e1) = (first.shard_id, first.lease_epoch);

    // Hand it back and get it again: the first epoch is now stale.
    agent.send(Out::Released(pb::ShardReleased { shard_id: shard, lease_epoch: e1, agent_leaving: false })).await;
    let In::Assign(second) = agent.next().await else { panic!("expected a second Assign") };
    assert_eq!(second.shard_id, shard);
    let e2 = second.lease_epoch;
    assert!(e2 > e1);

    agent.send(batch(shard, e1, 1, vec![result([192, 0, 2, 1], 80)])).await;
    refused(agent.next().await, pb::RefusalReason::StaleEpoch);
    agent.send(batch(shard + 1000, e2, 1, vec![result([192, 0, 2, 1], 80)])).await;
    refused(agent.next().await, pb::RefusalReason::UnknownShard);
    agent.send(batch(shard, e2, 1, (0..5001).map(|_| result([192, 0, 2, 1], 80)).collect())).await;
    refused(agent.next().await, pb::RefusalReason::BatchTooLarge);
    agent.send(batch(shard, e2, 5, vec![result([192, 0, 2, 1], 80)])).await;
    refused(agent.next().await, pb::RefusalReason::OutOfOrder);
    let five_byte_ip = pb::PortResult { ip: vec![192, 0, 2, 1, 9], ..result([0; 4], 80) };
    agent.send(batch(shard, e2, 1, vec![five_byte_ip])).await;
    refused(agent.next().await, pb::RefusalReason::Invalid);
    agent.beat().await;

    // A good batch is acked after commit; its resend is acked again and
    // writes nothing twice.
    for _ in 0..2 {
        agent.send(batch(shard, e2, 1, vec![result([192, 0, 2, 1], 80)])).await;
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
    api.create_scan(pb::CreateScanRequest {
        targets: vec!["192.0.2.0/30".into()],
        ports: "80".into(),
        ..Default::default()
    })
    .await
    .unwrap();
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
