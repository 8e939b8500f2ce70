//! What the controller binary writes to its log when callers misbehave:
//! caller input never forges a line or carries terminal escapes, nothing
//! the caller did wrong is an ERROR, each refusal is at most one line, and
//! no line echoes megabytes of input. The log goes to a file (not a
//! terminal), as under systemd or in a container.

use std::time::Duration;

use lapin::BasicProperties;
use portfleet_proto::{
    auth::Bearer,
    v1::{self as pb, agent_message::Frame, agent_service_client::AgentServiceClient},
};
use portfleet_tests::{
    TestDb,
    amqp::{TestBroker, until},
    binary,
    procs::{Proc, free_port, wait_for},
};
use tokio_stream::wrappers::ReceiverStream;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caller_input_cannot_forge_log_lines_and_client_errors_are_not_errors() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let token = db.token(portfleet_controller::auth::Scope::Scan).await;
    let logs = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1".parse().unwrap()));
    let c = &broker.config;
    let naabum8 = c.naabum8.as_ref().unwrap();
    let mut cmd = std::process::Command::new(binary("portfleet-controller"));
    cmd.args(["serve", "--insecure", "--database-url", db.url(), "--listen", &listen])
        .args(["--allow", "198.51.100.0/24", "--amqp-url", &c.url, "--amqp-exchange", &c.exchange])
        .args(["--amqp-queue", &c.queue, "--amqp-dead-letter-exchange", &c.dead_letter_exchange])
        .args(["--amqp-events-exchange", &c.events_exchange])
        .args(["--naabum8", "--naabum8-exchange", &naabum8.exchange, "--naabum8-queue", &naabum8.queue]);
    let controller = Proc::spawn_command("controller", cmd, &logs);
    broker.wait_ready().await;
    let url = format!("http://{listen}");
    let channel = tonic::transport::Channel::from_shared(url).unwrap().connect().await.unwrap();
    let forged = "x\n2026-01-01T00:00:00.000000Z ERROR forged: line\r\u{1b}[2J";

    // API calls a careless or hostile client makes.
    let mut api = portfleet_proto::auth::client(channel.clone(), Bearer::new(&token).unwrap());
    let bad = |targets: Vec<String>| pb::CreateScanRequest { targets, ports: "80".into(), ..Default::default() };
    let huge = format!("{}{forged}", "y".repeat(3_000_000));
    for targets in [vec![forged.to_string()], vec![huge]] {
        let err = api.create_scan(bad(targets)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
    }
    let mut labels = bad(vec!["198.51.100.1".into()]);
    labels.labels.insert("team".into(), forged.into());
    assert_eq!(api.create_scan(labels).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let mut anonymous = portfleet_proto::auth::client(channel.clone(), Bearer::new("").unwrap());
    let err = anonymous.list_scans(pb::ListScansRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let err = api.get_scan(pb::GetScanRequest { id: uuid::Uuid::new_v4().to_string() }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // An agent whose Hello carries a forged name.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::AgentMessage {
        frame: Some(Frame::Hello(pb::Hello {
            agent_id: uuid::Uuid::new_v4().to_string(),
            name: forged.into(),
            version: "test".into(),
            min_protocol_version: 1,
            max_protocol_version: 1,
            max_shards: 1,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let session = AgentServiceClient::new(channel.clone()).session(ReceiverStream::new(rx)).await;
    let refused = match session {
        Err(status) => status,
        Ok(resp) => resp.into_inner().message().await.unwrap_err(),
    };
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // AMQP messages with forged ids and bodies.
    for (id, body) in
        [(forged, b"not json\r\n".to_vec()), ("m2", format!(r#"{{"targets":[{forged:?}]}}"#).into_bytes())]
    {
        broker.publish(&c.exchange, &c.routing_key, &body, BasicProperties::default().with_message_id(id.into())).await;
    }
    let dlq = format!("{}.dlq", c.queue);
    until("both dead-lettered", Duration::from_secs(30), async || broker.depth(&dlq).await >= 2).await;
    // The log has caught up once the last refusal is in it.
    let log = wait_for("the dead letters logged", Duration::from_secs(10), || {
        let log = controller.log();
        (log.matches("request dead-lettered").count() >= 2).then_some(log)
    });

    let lines: Vec<&str> = log.lines().collect();
    for line in &lines {
        assert!(
            line.starts_with("20") && line.as_bytes().get(4) == Some(&b'-'),
            "a line not from the logger: {line:?}"
        );
        assert!(!line.chars().any(char::is_control), "a control character in {line:?}");
        assert!(line.len() < 4096, "a log line of {} bytes", line.len());
        let level = line.split_whitespace().nth(1);
        assert_ne!(level, Some("ERROR"), "a client's mistake logged as an error: {line}");
    }
    assert!(!log.contains("forged: line\n"), "a forged line");
    let unauthenticated = lines.iter().filter(|l| l.contains("unauthenticated")).count();
    assert_eq!(unauthenticated, 1, "one line per unauthenticated call:\n{log}");
    drop(controller);
}
