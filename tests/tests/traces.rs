//! Traces end to end (docs/operations.md, "Traces"): a real OTLP/gRPC
//! receiver (opentelemetry-proto's TraceService) runs in the test; the real
//! controller and agent binaries export to it with `--otlp-endpoint`.
//!
//! - A scan request published to the real RabbitMQ with a W3C
//!   `traceparent` header is one trace: the AMQP consume, the scan's
//!   creation, planning and storage, each Assign, the agent's shard span
//!   (the agent scans a target inside namespaces this test creates) and
//!   the controller's result-batch ingest spans, each the child of the one
//!   before across processes.
//! - A scan created over gRPC with `traceparent` metadata is traced the
//!   same way; the Assign and ResultBatch frames carry the context (a
//!   protocol-level agent double checks the frames themselves).
//! - Without the flag nothing is exported, even with the standard
//!   `OTEL_*` variables pointing at the receiver, and the caller's context
//!   is passed on unchanged.
//!
//! Probes go only to addresses inside the namespaces the test makes (or to
//! nobody: the agent double sends no packet).

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::Command,
    sync::atomic::Ordering,
    time::Duration,
};

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use portfleet_proto::v1::{self as pb, agent_message::Frame as Out};
use portfleet_tests::{
    TestDb,
    amqp::TestBroker,
    binary, eventually,
    fake_agent::FakeAgent,
    netns::NetTopology,
    otlp::{Got, Receiver},
    procs::{Proc, free_port},
};
use tonic::{Request, transport::Channel};

const TARGET: &str = "198.18.1.70";
const CTL_ARGS: &[&str] = &["--lease-ttl", "2s", "--heartbeat-interval", "500ms", "--allow", "198.18.0.0/15"];

/// A caller's fresh W3C context: (traceparent, trace id, its span id).
fn caller_context() -> (String, String, String) {
    let trace = uuid::Uuid::new_v4().simple().to_string();
    let span = uuid::Uuid::new_v4().simple().to_string()[..16].to_string();
    (format!("00-{trace}-{span}-01"), trace, span)
}

fn named<'a>(spans: &'a [Got], name: &str) -> Vec<&'a Got> {
    spans.iter().filter(|g| g.span.name == name).collect()
}

/// The only span named `name`, from `service`.
fn one<'a>(spans: &'a [Got], name: &str, service: &str) -> &'a Got {
    let found = named(spans, name);
    assert_eq!(found.len(), 1, "one {name} span expected in {:#?}", summary(spans));
    assert_eq!(found[0].service, service, "{name}");
    found[0]
}

/// name, service, id, parent: for assertion messages.
fn summary(spans: &[Got]) -> Vec<String> {
    spans.iter().map(|g| format!("{} [{}] {} <- {}", g.span.name, g.service, g.id(), g.parent())).collect()
}

/// The controller binary on `listen`, with `extra` flags and environment.
fn controller(db: &TestDb, listen: &str, extra: &[String], env: &[(&str, &str)], logs: &tempfile::TempDir) -> Proc {
    let mut cmd = Command::new(binary("portfleet-controller"));
    cmd.args(["serve", "--database-url", db.url(), "--listen", listen, "--insecure"]).args(extra);
    cmd.env_remove("DATABASE_URL").env_remove("PORTFLEET_OTLP_ENDPOINT").envs(env.iter().copied());
    Proc::spawn_command("controller", cmd, logs)
}

/// The agent binary in the scanner namespace, working for `controller_url`.
fn agent(
    topo: &NetTopology,
    controller_url: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    logs: &tempfile::TempDir,
) -> Proc {
    let mut cmd = topo.in_scanner(binary("portfleet-agent"));
    let state = logs.path().join("state");
    cmd.args(["run", "--controller", controller_url, "--name", "trace-agent", "--state-dir"]).arg(state).args(extra);
    cmd.env_remove("PORTFLEET_AGENT_OTLP_ENDPOINT").envs(env.iter().copied());
    Proc::spawn_command("agent", cmd, logs)
}

/// Publishes a scan request of TARGET's ports 22, 80 and 443 with the
/// caller's `traceparent` (and a `tracestate`) in its headers.
async fn publish_request(broker: &TestBroker, request_id: &str, traceparent: &str) {
    let mut headers = FieldTable::default();
    headers.insert("traceparent".into(), AMQPValue::LongString(traceparent.into()));
    headers.insert("tracestate".into(), AMQPValue::LongString("portfleet-test=1".into()));
    let props =
        BasicProperties::default().with_message_id(request_id.into()).with_delivery_mode(2).with_headers(headers);
    let body = format!(r#"{{"targets":["{TARGET}"],"ports":"22,80,443","rate":1000,"identify":false}}"#);
    broker.publish(&broker.config.exchange, &broker.config.routing_key, body.as_bytes(), props).await;
}

/// Waits for the scan of `request_id` to complete; its id, open ports and
/// stored trace context.
async fn completed(db: &TestDb, request_id: &str) -> (String, i64, Option<String>) {
    eventually("the scan to complete", Duration::from_secs(90), || async {
        let row: Option<(String, String, i64, Option<String>)> =
            sqlx::query_as("SELECT id::text, state, open_ports, trace_parent FROM scans WHERE request_id = $1")
                .bind(request_id)
                .fetch_optional(&mut db.connect().await)
                .await
                .unwrap();
        match row {
            Some((_, state, ..)) if state == "failed" || state == "cancelled" => panic!("scan {state}"),
            Some((id, state, open, trace)) if state == "completed" => Some((id, open, trace)),
            _ => None,
        }
    })
    .await
}

/// A scanner and target namespace, the database, the broker, a receiver
/// reachable from both namespaces' side (the management link), and
/// listeners on TARGET:80 and :443.
struct Lab {
    topo: NetTopology,
    db: TestDb,
    broker: TestBroker,
    receiver: Receiver,
    otlp_url: String,
    controller_url: String,
    logs: tempfile::TempDir,
    _open: portfleet_tests::netns::Listeners,
}

impl Lab {
    async fn new() -> Option<Self> {
        portfleet_tests::init_tracing();
        let topo = NetTopology::create_with_controller_link()?;
        let ip = IpAddr::V4(topo.controller_ip.expect("management link"));
        let receiver = Receiver::default();
        let otlp_url = receiver.start(ip).await;
        let target: IpAddr = TARGET.parse().unwrap();
        let open = topo.listen(&[SocketAddr::new(target, 80), SocketAddr::new(target, 443)]);
        let controller_url = format!("http://{ip}:{}", free_port(ip));
        Some(Self {
            topo,
            db: TestDb::create().await,
            broker: TestBroker::new().await,
            receiver,
            otlp_url,
            controller_url,
            logs: tempfile::tempdir().unwrap(),
            _open: open,
        })
    }

    /// The controller's flags: the lab's scope and leases, the broker's
    /// names (both request queues, which `wait_ready` waits for).
    fn controller_args(&self) -> Vec<String> {
        CTL_ARGS.iter().map(|a| a.to_string()).chain(self.broker.naabum8_controller_args()).collect()
    }

    fn listen(&self) -> &str {
        self.controller_url.trim_start_matches("http://")
    }
}

/// Stops a process with SIGTERM, which must flush its spans and exit 0.
fn stop(p: &mut Proc) {
    let status = p.terminate(Duration::from_secs(30)).unwrap_or_else(|| panic!("{} did not stop", p.name));
    assert!(status.success(), "{} exited with {status}", p.name);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_amqp_request_is_one_trace_from_the_message_to_the_result_batches() {
    let Some(lab) = Lab::new().await else { return };
    let mut flags = lab.controller_args();
    flags.extend(["--otlp-endpoint".to_string(), lab.otlp_url.clone()]);
    let mut ctl = controller(&lab.db, lab.listen(), &flags, &[], &lab.logs);
    lab.broker.wait_ready().await;
    let mut agt = agent(&lab.topo, &lab.controller_url, &["--otlp-endpoint", &lab.otlp_url], &[], &lab.logs);

    let (traceparent, trace_id, caller_span) = caller_context();
    publish_request(&lab.broker, "traced-1", &traceparent).await;
    let (scan_id, open, stored) = completed(&lab.db, "traced-1").await;
    assert_eq!(open, 2, "80 and 443 are open");
    // Graceful stops flush what is still queued.
    stop(&mut agt);
    stop(&mut ctl);

    let spans = lab.receiver.of_trace(&trace_id);
    let controller = "portfleet-controller";
    // The consume continues the publisher's span.
    let consume = one(&spans, "amqp.consume", controller);
    assert_eq!(consume.parent(), caller_span);
    assert_eq!(consume.span.kind, SpanKind::Consumer as i32);
    assert_eq!(consume.attr("messaging.system").as_deref(), Some("rabbitmq"));
    assert_eq!(consume.attr("messaging.message.id").as_deref(), Some("traced-1"));
    assert_eq!(consume.span.trace_state, "portfleet-test=1", "tracestate kept");
    // CreateScan: the request's span, its planning and its storage.
    let create = one(&spans, "scan.create", controller);
    assert_eq!(create.parent(), consume.id());
    assert_eq!(create.attr("scan_id").as_deref(), Some(scan_id.as_str()));
    let prepare = one(&spans, "scan.prepare", controller);
    assert_eq!(prepare.parent(), create.id());
    assert_eq!(one(&spans, "scan.plan", controller).parent(), prepare.id());
    let store = one(&spans, "scan.store", controller);
    assert_eq!(store.parent(), create.id());
    assert_eq!(one(&spans, "store.insert_scans", controller).parent(), store.id());
    // The scan keeps its creation's context for the schedulers.
    assert_eq!(stored, Some(format!("00-{trace_id}-{}-01", create.id())));
    // Each Assign is a child of the creation; each shard run on the agent
    // a child of its Assign.
    let assigns = named(&spans, "shard.assign");
    assert!(!assigns.is_empty(), "{:#?}", summary(&spans));
    let assign_ids: HashSet<String> = assigns.iter().map(|a| a.id()).collect();
    for a in &assigns {
        assert_eq!((a.service.as_str(), a.parent()), (controller, create.id()));
        assert_eq!(a.span.kind, SpanKind::Producer as i32);
        assert_eq!(a.attr("scan_id").as_deref(), Some(scan_id.as_str()));
    }
    let shards = named(&spans, "shard");
    assert_eq!(shards.len(), assigns.len(), "one shard run per Assign: {:#?}", summary(&spans));
    let shard_ids: HashSet<String> = shards.iter().map(|s| s.id()).collect();
    for s in &shards {
        assert_eq!(s.service, "portfleet-agent");
        assert!(assign_ids.contains(&s.parent()), "shard span's parent is an Assign: {:#?}", summary(&spans));
        assert_eq!(s.attr("scan_id").as_deref(), Some(scan_id.as_str()));
    }
    // Every result batch's ingest continues the agent's shard span, and
    // stores its rows inside it.
    let batches = named(&spans, "ingest.result_batch");
    assert!(!batches.is_empty(), "the open ports came in result batches: {:#?}", summary(&spans));
    let batch_ids: HashSet<String> = batches.iter().map(|b| b.id()).collect();
    let reported: i64 = batches.iter().map(|b| b.attr("results").unwrap().parse::<i64>().unwrap()).sum();
    assert!(reported >= 2, "{reported} results reported");
    for b in &batches {
        assert_eq!(b.service, controller);
        assert!(shard_ids.contains(&b.parent()), "ingest's parent is a shard span: {:#?}", summary(&spans));
    }
    let applied = named(&spans, "store.apply_results");
    assert_eq!(applied.len(), batches.len());
    assert!(applied.iter().all(|a| batch_ids.contains(&a.parent())));
    // No span of this scan went to another trace, and the periodic chores
    // make no traces of their own.
    let all = lab.receiver.spans();
    for g in all.iter().filter(|g| g.attr("scan_id").as_deref() == Some(scan_id.as_str())) {
        assert_eq!(g.trace_id(), trace_id, "{} of the scan in another trace", g.span.name);
    }
    assert!(
        all.iter().all(|g| !g.span.name.starts_with("scheduler.") && g.span.name != "session"),
        "{:#?}",
        summary(&all)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_create_scan_with_traceparent_metadata_is_traced_the_same_way() {
    portfleet_tests::init_tracing();
    let db = TestDb::create().await;
    let logs = tempfile::tempdir().unwrap();
    let receiver = Receiver::default();
    let localhost = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let otlp_url = receiver.start(localhost).await;
    let listen = format!("127.0.0.1:{}", free_port(localhost));
    let flags = ["--allow", "192.0.2.0/24", "--otlp-endpoint", &otlp_url].map(String::from);
    let mut ctl = controller(&db, &listen, &flags, &[], &logs);
    let url = format!("http://{listen}");
    let channel = eventually("the controller to answer", Duration::from_secs(30), || {
        let url = url.clone();
        async move { Channel::from_shared(url).ok()?.connect().await.ok() }
    })
    .await;
    // An agent double: it sends no packet, and shows the frames themselves.
    let mut fake = FakeAgent::connect_channel(channel.clone(), "trace-double").await;
    let token = db.token(portfleet_controller::auth::Scope::Admin).await;
    let mut api = portfleet_proto::auth::client(channel, portfleet_proto::auth::Bearer::new(&token).unwrap());

    let (traceparent, trace_id, caller_span) = caller_context();
    let mut request = Request::new(pb::CreateScanRequest {
        targets: vec!["192.0.2.10".into()],
        ports: "80,443".into(),
        identify: Some(false),
        ..Default::default()
    });
    request.metadata_mut().insert("traceparent", traceparent.parse().unwrap());
    let scan = api.create_scan(request).await.expect("create scan").into_inner();

    // The Assign names the scheduler's span in the caller's trace.
    let assign = fake.assigned(Duration::from_secs(30)).await.expect("an Assign");
    let sent = assign.trace_parent.clone().expect("the Assign carries trace context");
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!((parts.len(), parts[0], parts[1]), (4, "00", trace_id.as_str()), "{sent}");
    // The double's "shard span" reports a batch; the ingest continues it.
    let double_span = "0123456789abcdef";
    let results = vec![pb::PortResult {
        ip: vec![192, 0, 2, 10],
        port: 443,
        state: pb::PortState::Open as i32,
        ..Default::default()
    }];
    let (shard_id, lease_epoch) = (assign.shard_id, assign.lease_epoch);
    let trace_parent = Some(format!("00-{trace_id}-{double_span}-01"));
    fake.send(Out::Results(pb::ResultBatch { shard_id, lease_epoch, seq: 1, results, trace_parent })).await;
    fake.send(Out::Complete(pb::ShardComplete { shard_id, lease_epoch, seq: 2, counts: None })).await;
    eventually("the scan to complete", Duration::from_secs(30), || {
        let (mut api, id) = (api.clone(), scan.id.clone());
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (s.state == pb::ScanState::Completed as i32).then_some(())
        }
    })
    .await;
    drop(fake);
    stop(&mut ctl);

    let spans = receiver.of_trace(&trace_id);
    let controller = "portfleet-controller";
    let call = one(&spans, "portfleet.v1.ScanService/CreateScan", controller);
    assert_eq!((call.parent(), call.span.kind), (caller_span, SpanKind::Server as i32));
    assert_eq!(call.attr("rpc.method").as_deref(), Some("CreateScan"));
    let create = one(&spans, "scan.create", controller);
    assert_eq!(create.parent(), call.id());
    assert_eq!(one(&spans, "scan.prepare", controller).parent(), create.id());
    assert_eq!(one(&spans, "scan.store", controller).parent(), create.id());
    let assign_span = one(&spans, "shard.assign", controller);
    assert_eq!(assign_span.parent(), create.id());
    assert_eq!(parts[2], assign_span.id(), "the Assign names its own span");
    let ingest = one(&spans, "ingest.result_batch", controller);
    assert_eq!(ingest.parent(), double_span);
    assert_eq!(ingest.attr("results").as_deref(), Some("1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_flag_nothing_is_exported() {
    let Some(lab) = Lab::new().await else { return };
    // The standard OpenTelemetry variables point at the receiver: without
    // --otlp-endpoint they must change nothing.
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", lab.otlp_url.as_str()),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", lab.otlp_url.as_str()),
        ("OTEL_TRACES_EXPORTER", "otlp"),
    ];
    let mut ctl = controller(&lab.db, lab.listen(), &lab.controller_args(), &env, &lab.logs);
    lab.broker.wait_ready().await;
    let mut agt = agent(&lab.topo, &lab.controller_url, &[], &env, &lab.logs);

    let (traceparent, ..) = caller_context();
    publish_request(&lab.broker, "untraced-1", &traceparent).await;
    let (_, open, stored) = completed(&lab.db, "untraced-1").await;
    assert_eq!(open, 2);
    // The caller's context is kept as it came, for a traced controller.
    assert_eq!(stored.as_deref(), Some(traceparent.as_str()));
    stop(&mut agt);
    stop(&mut ctl);
    // Both have exited: whatever they would have sent has been sent.
    assert_eq!(lab.receiver.exports.load(Ordering::SeqCst), 0, "{:#?}", summary(&lab.receiver.spans()));
    for p in [&ctl, &agt] {
        assert!(!p.log().to_lowercase().contains("opentelemetry"), "{}: {}", p.name, p.log());
    }
}
