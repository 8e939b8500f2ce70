//! What the controller binary writes to its log when callers misbehave:
//! caller input never forges a line or carries terminal escapes, nothing
//! the caller did wrong is an ERROR, each refusal is at most one line, and
//! no line echoes megabytes of input. The log goes to a file (not a
//! terminal), as under systemd or in a container. And the agent's log:
//! its format flag anywhere on the command line, colour only on a terminal.

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
        .args(["--allow", "198.51.100.0/24"])
        .args(broker.controller_args())
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

/// Agents that cannot reach their controller (nothing listens on its port),
/// with `--log-format` before and after the subcommand, or from the
/// environment: JSON lines are JSON, plain lines in a file carry no escape
/// codes, and the failure names its cause, not a bare "transport error".
#[test]
fn agent_logs_take_their_format_anywhere_and_name_the_cause() {
    let logs = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}", free_port("127.0.0.1".parse().unwrap()));
    let agent = |name: &str, before: &[&str], after: &[&str], env: Option<&str>| {
        let mut cmd = std::process::Command::new(binary("portfleet-agent"));
        cmd.args(before).args(["run", "--controller", &url, "--name", name, "--state-dir"]);
        cmd.arg(logs.path().join(name)).args(after).env_remove("PORTFLEET_LOG_FORMAT").env_remove("NO_COLOR");
        if let Some(format) = env {
            cmd.env("PORTFLEET_LOG_FORMAT", format);
        }
        Proc::spawn_command(name, cmd, &logs)
    };
    let json = [
        agent("json-after", &[], &["--log-format", "json"], None),
        agent("json-before", &["--log-format", "json"], &[], None),
        agent("json-env", &[], &[], Some("json")),
    ];
    let plain = agent("plain", &[], &["--log-format", "plain"], Some("json"));
    let unreachable = |p: &Proc| {
        wait_for("the agent failing to connect", Duration::from_secs(20), || {
            let log = p.log();
            log.contains("cannot reach the controller").then_some(log)
        })
    };
    for p in &json {
        let log = unreachable(p);
        let lines: Vec<serde_json::Value> = log
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: not JSON ({e}): {l:?}", p.name)))
            .collect();
        let failed = lines.iter().find(|l| l["message"] == "cannot reach the controller").unwrap();
        let error = failed["error"].as_str().unwrap();
        assert!(error.starts_with("transport error: ") && error.contains("refused"), "{}: {error}", p.name);
    }
    // The flag wins over the environment.
    let log = unreachable(&plain);
    assert!(!log.contains('\u{1b}'), "escape codes in a log file: {log:?}");
    assert!(log.lines().all(|l| !l.starts_with('{')), "{log}");
    let failed = log.lines().find(|l| l.contains("cannot reach the controller")).unwrap();
    assert!(failed.contains("error=transport error: ") && failed.contains("refused"), "{failed}");
}

/// Colour on a terminal, and only there: the agent under a pseudo-terminal
/// (`script`) colours its levels, unless `NO_COLOR` is set.
#[test]
fn agent_logs_are_coloured_only_on_a_terminal_without_no_color() {
    if std::process::Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipping: no `script` (util-linux) to run the agent on a terminal");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{}", free_port("127.0.0.1".parse().unwrap()));
    let on_a_terminal = |no_color: &str| {
        let agent = format!(
            "timeout -s INT 3 {} run --controller {url} --name tty --state-dir {}",
            binary("portfleet-agent").display(),
            dir.path().display()
        );
        let out = std::process::Command::new("script")
            .args(["-qefc", &agent, "/dev/null"])
            .env("NO_COLOR", no_color)
            .env("RUST_LOG", "info")
            .env_remove("PORTFLEET_LOG_FORMAT")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("cannot reach the controller"), "{text:?}");
        text
    };
    assert!(on_a_terminal("").contains("\u{1b}["), "no colour on a terminal");
    let plain = on_a_terminal("1");
    assert!(!plain.contains('\u{1b}'), "escape codes with NO_COLOR: {plain:?}");
}

/// ERROR means a human must act: no refusal of a caller or an agent is one
/// (already exists, permission denied, not found, failed precondition,
/// invalid argument), a clean shutdown with a session, a watch and the
/// ingress open logs none, fields carry values rather than Debug
/// (`addr=Some(..)`), and the database's notices on every command
/// ("relation ... already exists, skipping") stay out of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_a_clean_shutdown_are_not_errors() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let logs = tempfile::tempdir().unwrap();
    for name in ["migrate-1", "migrate-2", "tokens"] {
        let mut cmd = std::process::Command::new(binary("portfleet-controller"));
        match name {
            "tokens" => cmd.args(["tokens", "list", "--database-url", db.url()]),
            _ => cmd.args(["migrate", "--database-url", db.url()]),
        };
        let mut p = Proc::spawn_command(name, cmd, &logs);
        assert!(p.wait_exit(Duration::from_secs(30)).is_some_and(|s| s.success()), "{name}: {}", p.log());
        let log = p.log();
        assert!(!log.contains("notice") && !log.contains("already exists"), "{name}: a database notice:\n{log}");
    }

    let token = db.token(portfleet_controller::auth::Scope::Admin).await;
    let listen = format!("127.0.0.1:{}", free_port("127.0.0.1".parse().unwrap()));
    let c = &broker.config;
    let mut cmd = std::process::Command::new(binary("portfleet-controller"));
    cmd.args(["serve", "--insecure", "--database-url", db.url(), "--listen", &listen])
        .args(["--allow", "198.51.100.0/24,203.0.113.0/24"])
        .args(broker.controller_args());
    let naabum8 = c.naabum8.as_ref().unwrap();
    cmd.args(["--naabum8", "--naabum8-exchange", &naabum8.exchange, "--naabum8-queue", &naabum8.queue]);
    let mut controller = Proc::spawn_command("controller", cmd, &logs);
    broker.wait_ready().await;
    let channel = tonic::transport::Channel::from_shared(format!("http://{listen}")).unwrap().connect().await.unwrap();
    let mut api = portfleet_proto::auth::client(channel.clone(), Bearer::new(&token).unwrap());
    let scan = |targets: &str, ports: &str, request_id: &str| pb::CreateScanRequest {
        targets: vec![targets.into()],
        ports: ports.into(),
        request_id: request_id.into(),
        ..Default::default()
    };

    // An agent session, and a second one claiming its id.
    let agent_id = uuid::Uuid::new_v4().to_string();
    let session = |agent_id: String| {
        let channel = channel.clone();
        async move {
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let hello = pb::Hello {
                agent_id,
                name: "scanner-1".into(),
                version: "test".into(),
                min_protocol_version: 1,
                max_protocol_version: 1,
                max_shards: 1,
                ..Default::default()
            };
            tx.send(pb::AgentMessage { frame: Some(Frame::Hello(hello)) }).await.unwrap();
            let mut stream = AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await?.into_inner();
            stream.message().await?;
            Ok::<_, tonic::Status>((tx, stream))
        }
    };
    let _agent = session(agent_id.clone()).await.unwrap();
    let twin = session(agent_id).await.map(|_| ()).unwrap_err();
    assert_eq!(twin.code(), tonic::Code::AlreadyExists);

    // A watched scan (the agent holds its shard), and refusals of each kind.
    let watched = api.create_scan(scan("203.0.113.0/30", "80", "")).await.unwrap().into_inner();
    let mut watch = api.watch_scan(pb::WatchScanRequest { id: watched.id.clone() }).await.unwrap().into_inner();
    watch.message().await.unwrap();
    let job = api.create_scan(scan("198.51.100.1", "80", "job-1")).await.unwrap().into_inner();
    let code = |r: Result<tonic::Response<pb::Scan>, tonic::Status>| r.unwrap_err().code();
    assert_eq!(code(api.create_scan(scan("198.51.100.1", "22", "job-1")).await), tonic::Code::AlreadyExists);
    assert_eq!(code(api.create_scan(scan("192.0.2.1", "80", "")).await), tonic::Code::PermissionDenied);
    assert_eq!(code(api.create_scan(scan("", "80", "")).await), tonic::Code::InvalidArgument);
    let unknown = uuid::Uuid::new_v4().to_string();
    assert_eq!(code(api.cancel_scan(pb::CancelScanRequest { id: unknown }).await), tonic::Code::NotFound);
    api.update_scope_policy(pb::UpdateScopePolicyRequest {
        add_deny: vec!["198.51.100.0/24".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(code(api.cancel_scan(pb::CancelScanRequest { id: job.id }).await), tonic::Code::FailedPrecondition);

    let status = controller.terminate(Duration::from_secs(20)).expect("the controller stops on SIGTERM");
    assert!(status.success(), "{status:?}");
    let log = controller.log();
    assert!(log.contains("controller stopped"), "{log}");
    for line in log.lines() {
        assert_ne!(line.split_whitespace().nth(1), Some("ERROR"), "not for a human to act on: {line}");
        assert!(!line.contains("=Some(") && !line.contains("=None"), "a Debug value in a field: {line}");
    }
    assert!(!log.contains("notice"), "a database notice:\n{log}");
    assert!(log.contains(&format!("controller serving addr={listen}")), "{log}");
}
