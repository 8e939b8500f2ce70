//! The RabbitMQ ingress against the real broker and a real Postgres:
//! every request becomes exactly one scan, acked only after commit; bad
//! ones are dead-lettered with a reason; nothing is lost or doubled when
//! connections drop or the controller stops; NaabuM8's messages work.
//! Scans here target TEST-NET addresses and no agent runs: nothing probes.

use std::{collections::HashSet, time::Duration};

use lapin::BasicProperties;
use portfleet_controller::ControllerConfig;
use portfleet_proto::v1 as pb;
use portfleet_tests::{
    TestController, TestDb,
    amqp::{TestBroker, dead_letter_reason, until},
};
use sqlx::Connection as _;

fn props(message_id: &str) -> BasicProperties {
    BasicProperties::default().with_message_id(message_id.into()).with_delivery_mode(2)
}

fn request(i: usize) -> Vec<u8> {
    format!(r#"{{"targets":["198.51.100.{}"],"ports":"80,443","scan_type":"syn","rate":500}}"#, i % 250 + 1)
        .into_bytes()
}

fn config(db: &TestDb, broker: &TestBroker) -> ControllerConfig {
    let mut c = portfleet_tests::controller_config(db.options());
    c.ingress = Some(broker.config.clone());
    c
}

/// A controller with the ingress, consuming.
async fn start(cfg: ControllerConfig, broker: &TestBroker) -> TestController {
    let c = TestController::start(cfg).await;
    broker.wait_ready().await;
    c
}

async fn scan_count(db: &TestDb) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM scans").fetch_one(&mut db.connect().await).await.unwrap()
}

async fn request_ids(db: &TestDb) -> Vec<String> {
    sqlx::query_scalar("SELECT request_id FROM scans").fetch_all(&mut db.connect().await).await.unwrap()
}

/// Every message id became exactly one scan.
async fn assert_one_scan_each(db: &TestDb, ids: &HashSet<String>) {
    let got = request_ids(db).await;
    let unique: HashSet<String> = got.iter().cloned().collect();
    assert_eq!(got.len(), unique.len(), "a request created two scans");
    assert_eq!(&unique, ids);
}

#[tokio::test]
async fn ten_thousand_requests_become_ten_thousand_scans() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let controller = start(config(&db, &broker), &broker).await;
    let key = broker.config.routing_key.clone();
    let ids: HashSet<String> = (0..10_000).map(|i| format!("bulk-{i}")).collect();
    broker.publish_many((0..10_000).map(|i| (key.clone(), request(i), props(&format!("bulk-{i}"))))).await;
    until("10,000 scans", Duration::from_secs(120), async || scan_count(&db).await == 10_000).await;
    // Stopping returns anything unacked to the queue: it must be empty.
    controller.stop().await.unwrap();
    assert_eq!(broker.depth(&broker.config.queue).await, 0, "every message was acked");
    assert_eq!(broker.depth(&format!("{}.dlq", broker.config.queue)).await, 0);
    assert_one_scan_each(&db, &ids).await;
}

#[tokio::test]
async fn malformed_requests_are_dead_lettered_with_a_reason() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let _controller = start(config(&db, &broker), &broker).await;
    let key = broker.config.routing_key.clone();
    let bad: [&[u8]; 5] = [
        b"not json at all",
        br#"{"targets":["192.0.2.1"],"unknown":1}"#,
        br#"{"targets":["192.0.2.999"],"ports":"80"}"#,
        br#"{"targets":["192.0.2.1"],"ports":"80,99999"}"#,
        br#"{"targets":["198.18.0.0/15"],"ports":"full"}"#,
    ];
    let mut messages = Vec::new();
    for i in 0..100 {
        messages.push((key.clone(), request(i), props(&format!("good-{i}"))));
        messages.push((key.clone(), bad[i % bad.len()].to_vec(), props(&format!("bad-{i}"))));
    }
    broker.publish_many(messages).await;
    let dlq = format!("{}.dlq", broker.config.queue);
    until("100 scans and 100 dead letters", Duration::from_secs(60), async || {
        scan_count(&db).await == 100 && broker.depth(&dlq).await == 100
    })
    .await;
    let dead = broker.drain(&dlq).await;
    assert_eq!(dead.len(), 100);
    for m in &dead {
        let reason = dead_letter_reason(m);
        assert!(!reason.is_empty());
        let id = m.delivery.properties.message_id().as_ref().unwrap().to_string();
        assert!(id.starts_with("bad-"), "{id} dead-lettered: {reason}");
    }
    // Still consuming.
    broker.publish(&broker.config.exchange, &key, &request(7), props("after")).await;
    until("the consumer to carry on", Duration::from_secs(30), async || scan_count(&db).await == 101).await;
}

#[tokio::test]
async fn a_redelivered_message_makes_one_scan() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let _controller = start(config(&db, &broker), &broker).await;
    let key = broker.config.routing_key.clone();
    for _ in 0..3 {
        broker.publish(&broker.config.exchange, &key, &request(1), props("same-id")).await;
    }
    // And one without any id: the digest of its content is the key.
    let body = br#"{"targets":["198.51.100.77"],"ports":"22"}"#;
    for _ in 0..2 {
        broker.publish(&broker.config.exchange, &key, body, BasicProperties::default()).await;
    }
    until("the queue to drain", Duration::from_secs(30), async || {
        broker.depth(&broker.config.queue).await == 0 && scan_count(&db).await >= 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(scan_count(&db).await, 2);
}

/// A message id used again with another body is dead-lettered naming the
/// scan that holds it - apart or in one batch with the first - while a
/// redelivery of the same body is still acked as that scan.
#[tokio::test]
async fn a_message_id_reused_with_a_different_body_is_dead_lettered() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let _controller = start(config(&db, &broker), &broker).await;
    let (exchange, key) = (broker.config.exchange.clone(), broker.config.routing_key.clone());
    broker.publish(&exchange, &key, &request(1), props("job-1")).await;
    until("the first scan", Duration::from_secs(30), async || scan_count(&db).await == 1).await;
    let first: String = sqlx::query_scalar("SELECT id::text FROM scans WHERE request_id = 'job-1'")
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap();
    broker
        .publish_many([
            (key.clone(), request(2), props("job-1")),
            (key.clone(), request(1), props("job-1")),
            (key.clone(), request(3), props("pair")),
            (key.clone(), request(4), props("pair")),
        ])
        .await;
    let dlq = format!("{}.dlq", broker.config.queue);
    until("two dead letters", Duration::from_secs(30), async || {
        broker.depth(&dlq).await == 2 && broker.depth(&broker.config.queue).await == 0
    })
    .await;
    let mut reasons: Vec<(String, String)> = broker
        .drain(&dlq)
        .await
        .iter()
        .map(|m| (m.delivery.properties.message_id().as_ref().unwrap().to_string(), dead_letter_reason(m)))
        .collect();
    reasons.sort();
    assert_eq!(reasons[0].0, "job-1");
    assert_eq!(reasons[0].1, format!("request_id job-1 was used by scan {first} with a different request"));
    assert_eq!(reasons[1].0, "pair");
    assert!(reasons[1].1.starts_with("request_id pair was used by scan "), "{}", reasons[1].1);
    assert_eq!(scan_count(&db).await, 2, "job-1 and pair, once each");
}

#[tokio::test]
async fn dropped_broker_connections_lose_and_double_nothing() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let mut cfg = config(&db, &broker);
    cfg.fleet.controller_id = format!("ctl-{}", broker.prefix);
    let _controller = start(cfg, &broker).await;
    let key = broker.config.routing_key.clone();
    let ids: HashSet<String> = (0..3000).map(|i| format!("drop-{i}")).collect();
    broker.publish_many((0..3000).map(|i| (key.clone(), request(i), props(&format!("drop-{i}"))))).await;
    until("some scans", Duration::from_secs(30), async || scan_count(&db).await > 300).await;
    let name = format!("ctl-{}", broker.prefix);
    assert!(broker.close_connections_named(&name) >= 1, "found the controller's connection");
    until("all 3000 scans", Duration::from_secs(120), async || scan_count(&db).await >= 3000).await;
    until("the queue to drain", Duration::from_secs(30), async || broker.depth(&broker.config.queue).await == 0).await;
    assert_one_scan_each(&db, &ids).await;
}

#[tokio::test]
async fn requests_in_flight_at_shutdown_go_to_the_next_consumer() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let key = broker.config.routing_key.clone();
    let total = 6000;
    let ids: HashSet<String> = (0..total).map(|i| format!("handover-{i}")).collect();
    let first = start(config(&db, &broker), &broker).await;
    broker.publish_many((0..total).map(|i| (key.clone(), request(i), props(&format!("handover-{i}"))))).await;
    until("the first controller at work", Duration::from_secs(30), async || scan_count(&db).await > 100).await;
    first.stop().await.unwrap();
    let taken = scan_count(&db).await;
    assert!(taken < total as i64, "the first controller took everything; the test proves nothing");
    let _second = start(config(&db, &broker), &broker).await;
    until("every scan", Duration::from_secs(120), async || scan_count(&db).await >= total as i64).await;
    assert_one_scan_each(&db, &ids).await;
}

/// An unavailable database is not the messages' fault: requests that
/// arrive during an outage far longer than the delivery limit's retries
/// (here a private Postgres stopped as in a crash) are held, not
/// dead-lettered, and become scans once it is back.
#[tokio::test]
async fn a_database_outage_loses_no_request() {
    let pg = portfleet_tests::pgcluster::PgCluster::start().await;
    let broker = TestBroker::new().await;
    let mut cfg = portfleet_tests::controller_config(pg.options());
    cfg.ingress = Some(broker.config.clone());
    cfg.database.acquire_timeout = Duration::from_millis(300);
    cfg.ingress.as_mut().unwrap().delivery_limit = 3;
    let _controller = start(cfg, &broker).await;
    let key = broker.config.routing_key.clone();
    let count = async || -> i64 {
        let Ok(mut conn) = sqlx::PgConnection::connect_with(&pg.options()).await else { return -1 };
        sqlx::query_scalar("SELECT count(*) FROM scans").fetch_one(&mut conn).await.unwrap_or(-1)
    };
    let batch = |range: std::ops::Range<usize>| -> Vec<(String, Vec<u8>, lapin::BasicProperties)> {
        range.map(|i| (key.clone(), request(i), props(&format!("req-{i}")))).collect()
    };
    broker.publish_many(batch(0..100)).await;
    until("the first 100 scans", Duration::from_secs(30), async || count().await == 100).await;

    pg.stop().await;
    broker.publish_many(batch(100..300)).await;
    // Many times what three attempts with backoff take.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let dlq = format!("{}.dlq", broker.config.queue);
    assert_eq!(broker.depth(&dlq).await, 0, "requests were dead-lettered during the outage");
    pg.start_again().await;
    until("every scan", Duration::from_secs(60), async || count().await == 300).await;
    assert_eq!(broker.depth(&dlq).await, 0);
    assert_eq!(broker.depth(&broker.config.queue).await, 0);
    let mut conn = sqlx::PgConnection::connect_with(&pg.options()).await.unwrap();
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT request_id) FROM scans").fetch_one(&mut conn).await.unwrap();
    assert_eq!(distinct, 300, "one scan per request");
}

#[tokio::test]
async fn naabum8_messages_make_the_right_scans_and_announce_completion() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    // A broker NaabuM8 used already has its queue, declared differently.
    broker.declare_legacy_naabum8_queue().await;
    let controller = start(config(&db, &broker), &broker).await;
    let n = broker.config.naabum8.clone().unwrap();
    let mut completions = broker.listen(&n.exchange, &n.completion_key).await;
    let mut api = controller.client().await;
    api.create_targets(pb::CreateTargetsRequest {
        targets: vec![
            pb::Target { value: "198.51.100.10".into(), group: "42".into(), ..Default::default() },
            pb::Target { value: "198.51.100.11".into(), group: "42".into(), ..Default::default() },
            pb::Target { value: "198.51.100.12".into(), group: "7".into(), ..Default::default() },
            pb::Target { value: "198.51.100.13".into(), group: "7".into(), enabled: Some(false), ..Default::default() },
        ],
    })
    .await
    .unwrap();
    let envelope = |channel: &str, payload: &str| {
        format!(r#"{{"channel":"{channel}","payload":{payload},"timestamp":"2026-11-29T00:00:00Z","source":"orchestrator"}}"#)
            .into_bytes()
    };
    // The legacy queue holds one message at a time: publish one by one.
    let cases = [
        ("cptm8.naabum8.get.scan", "null", 3),
        ("cptm8.naabum8.get.scan/domain/42", "{}", 2),
        ("cptm8.naabum8.post.scan", r#"{"target":[{"id":1,"name":"localhost"}]}"#, 1),
    ];
    for (i, (rk, payload, _)) in cases.iter().enumerate() {
        broker.publish(&n.exchange, rk, &envelope(rk, payload), props(&format!("naabu-{i}"))).await;
        until("the scan", Duration::from_secs(30), async || scan_count(&db).await == i as i64 + 1).await;
    }
    let scans =
        api.list_scans(pb::ListScansRequest { page_size: 10, ..Default::default() }).await.unwrap().into_inner().scans;
    // Newest first.
    let addresses: Vec<u64> = scans.iter().rev().map(|s| s.address_count).collect();
    assert_eq!(addresses[0], 3, "get.scan: every enabled target");
    assert_eq!(addresses[1], 2, "get.scan/domain/42: group 42's enabled targets");
    assert!(addresses[2] >= 1, "post.scan: the named hosts");
    assert!(scans.iter().all(|s| s.request.as_ref().unwrap().labels["naabum8.source"] == "orchestrator"));

    // Ending the scan announces it as NaabuM8 did.
    api.cancel_scan(pb::CancelScanRequest { id: scans[0].id.clone() }).await.unwrap();
    let (rk, body, _) = tokio::time::timeout(Duration::from_secs(15), completions.recv()).await.unwrap().unwrap();
    assert_eq!(rk, n.completion_key);
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["channel"], n.completion_key);
    assert_eq!(v["payload"]["status"], "incomplete");
    assert!(v["payload"]["message"].as_str().unwrap().contains(&scans[0].id));
    assert!(v["timestamp"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn lifecycle_events_and_replies_are_published() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let controller = start(config(&db, &broker), &broker).await;
    let mut events = broker.listen(&broker.config.events_exchange, "scan.*").await;
    // A reply queue of our own; exclusive, so it goes with our connection.
    let reply_queue = format!("{}.replies", broker.prefix);
    {
        let ch = broker.conn.create_channel().await.unwrap();
        let exclusive = lapin::options::QueueDeclareOptions { exclusive: true, ..Default::default() };
        ch.queue_declare(reply_queue.as_str().into(), exclusive, Default::default()).await.unwrap();
    }
    let key = broker.config.routing_key.clone();
    let p = props("evented").with_reply_to(reply_queue.as_str().into()).with_correlation_id("corr-1".into());
    broker.publish(&broker.config.exchange, &key, &request(3), p).await;
    let (rk, body, props) = tokio::time::timeout(Duration::from_secs(15), events.recv()).await.unwrap().unwrap();
    assert_eq!(rk, "scan.created");
    assert_eq!(props.delivery_mode(), &Some(2), "persistent");
    let created: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let id = created["scan_id"].as_str().unwrap().to_string();
    assert_eq!(created["request_id"], "evented");
    until("the reply", Duration::from_secs(15), async || broker.depth(&reply_queue).await == 1).await;
    let reply = broker.drain(&reply_queue).await;
    assert_eq!(reply[0].delivery.properties.correlation_id().as_ref().map(|c| c.as_str()), Some("corr-1"));
    let mut api = controller.client().await;
    api.cancel_scan(pb::CancelScanRequest { id: id.clone() }).await.unwrap();
    let (rk, body, _) = tokio::time::timeout(Duration::from_secs(15), events.recv()).await.unwrap().unwrap();
    assert_eq!(rk, "scan.cancelled");
    let cancelled: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(cancelled["scan_id"], id.as_str());
    assert_eq!(cancelled["state"], "cancelled");
    assert!(cancelled["finished_at"].is_string());
    // Then what the scan changed in the inventory: nothing, it probed
    // nothing.
    let (rk, body, props) = tokio::time::timeout(Duration::from_secs(15), events.recv()).await.unwrap().unwrap();
    assert_eq!(rk, "scan.changes");
    let changes: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(changes["scan_id"], id.as_str());
    assert_eq!((changes["page"].as_u64(), changes["pages"].as_u64()), (Some(1), Some(1)));
    assert_eq!(changes["counts"], serde_json::json!({"opened": 0, "closed": 0, "service_changed": 0}));
    assert_eq!(changes["changes"], serde_json::json!([]));
    assert_eq!(props.message_id().as_ref().map(|m| m.to_string()), Some(format!("{id}:scan.changes:1")));
    // Published once: nothing else arrives.
    assert!(tokio::time::timeout(Duration::from_secs(2), events.recv()).await.is_err());
}

/// Deliveries dead-lettered so far.
async fn dead_letters(broker: &TestBroker) -> Vec<lapin::message::BasicGetMessage> {
    broker.drain(&format!("{}.dlq", broker.config.queue)).await
}

/// (message id, reason) of each delivery dead-lettered so far, sorted.
async fn dead_letter_reasons(broker: &TestBroker) -> Vec<(String, String)> {
    let mut reasons: Vec<(String, String)> = dead_letters(broker)
        .await
        .iter()
        .map(|m| (m.delivery.properties.message_id().as_ref().unwrap().to_string(), dead_letter_reason(m)))
        .collect();
    reasons.sort();
    reasons
}

/// One request with text Postgres cannot store (a NUL) failed its whole
/// batch's insert, and every request of the batch was retried and
/// dead-lettered with it. Now it is refused on its own, at once.
#[tokio::test]
async fn a_bad_request_costs_no_other_request_its_scan() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let mut cfg = config(&db, &broker);
    cfg.ingress.as_mut().unwrap().delivery_limit = 2;
    let _controller = start(cfg, &broker).await;
    let key = broker.config.routing_key.clone();
    let mut good = HashSet::new();
    let mut messages = Vec::new();
    for i in 0..330 {
        let id = format!("req-{i}");
        let body = if i % 11 == 5 {
            // NUL or a line break in a label, the request id, the group.
            match i % 3 {
                0 => br#"{"targets":["198.51.100.9"],"labels":{"team":"a\u0000b"}}"#.to_vec(),
                1 => br#"{"targets":["198.51.100.9"],"request_id":"x\u0000y"}"#.to_vec(),
                _ => br#"{"target_group":"g\r\nforged"}"#.to_vec(),
            }
        } else {
            good.insert(id.clone());
            request(i)
        };
        messages.push((key.clone(), body, props(&id)));
    }
    broker.publish_many(messages).await;
    until("every good request's scan", Duration::from_secs(60), async || scan_count(&db).await >= 300).await;
    let dlq = format!("{}.dlq", broker.config.queue);
    until("the 30 bad ones dead-lettered", Duration::from_secs(30), async || broker.depth(&dlq).await >= 30).await;
    assert_one_scan_each(&db, &good).await;
    for m in dead_letters(&broker).await {
        let id = m.delivery.properties.message_id().as_ref().unwrap().to_string();
        assert!(!good.contains(&id), "a good request was dead-lettered: {id}");
        let reason = dead_letter_reason(&m);
        assert!(reason.contains("control character"), "{reason}");
        let attempts = m.delivery.properties.headers().as_ref().unwrap().inner().get("x-portfleet-attempts").cloned();
        assert_eq!(attempts, Some(lapin::types::AMQPValue::LongUInt(1)), "refused at once, not retried");
    }
}

/// When the database refuses one request's values (here a trigger stands
/// for any data error validation cannot foresee), the batch is stored one
/// request at a time and only that one is dead-lettered.
#[tokio::test]
async fn a_value_the_database_refuses_fails_only_its_own_request() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let _controller = start(config(&db, &broker), &broker).await;
    let mut conn = db.connect().await;
    for sql in [
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
         IF NEW.labels ? 'poison' THEN RAISE EXCEPTION 'poisoned label' USING ERRCODE = '22023'; END IF; \
         IF NEW.labels ? 'flaky' THEN RAISE EXCEPTION 'flaky trigger'; END IF; \
         RETURN NEW; END $$",
        "CREATE TRIGGER poison BEFORE INSERT ON scans FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    let key = broker.config.routing_key.clone();
    let mut good = HashSet::new();
    let mut messages = Vec::new();
    for i in 0..102 {
        let id = format!("req-{i}");
        let body = if i == 50 {
            br#"{"targets":["198.51.100.9"],"labels":{"poison":"yes"}}"#.to_vec()
        } else if i == 70 {
            br#"{"targets":["198.51.100.9"],"labels":{"flaky":"yes"}}"#.to_vec()
        } else {
            good.insert(id.clone());
            request(i)
        };
        messages.push((key.clone(), body, props(&id)));
    }
    broker.publish_many(messages).await;
    until("every good request's scan", Duration::from_secs(30), async || scan_count(&db).await >= 100).await;
    let dlq = format!("{}.dlq", broker.config.queue);
    until("the two bad ones dead-lettered", Duration::from_secs(60), async || broker.depth(&dlq).await >= 2).await;
    assert_one_scan_each(&db, &good).await;
    let dead = dead_letter_reasons(&broker).await;
    assert_eq!(dead.len(), 2);
    // A data error is refused at once; any other error about the request
    // is retried up to the delivery limit (5 by default).
    assert_eq!(dead[0].0, "req-50");
    assert!(dead[0].1.contains("poisoned label") && !dead[0].1.contains("gave up"), "{}", dead[0].1);
    assert_eq!(dead[1].0, "req-70");
    assert!(dead[1].1.contains("gave up after 5 attempts") && dead[1].1.contains("flaky trigger"), "{}", dead[1].1);
}

/// A body over the size limit is dead-lettered unparsed, and a target list
/// over the cap is refused while it is read; the requests around them are
/// stored.
#[tokio::test]
async fn oversized_messages_are_dead_lettered_unparsed() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let mut cfg = config(&db, &broker);
    cfg.limits.max_targets = 100;
    let _controller = start(cfg, &broker).await;
    let key = broker.config.routing_key.clone();
    let big: Vec<String> = (0..150_000).map(|i| format!("198.51.100.{}", i % 250)).collect();
    let big = serde_json::to_vec(&serde_json::json!({ "targets": big })).unwrap();
    assert!(big.len() > portfleet_controller::ingress::DEFAULT_MAX_MESSAGE_BYTES);
    let many: Vec<String> = (0..101).map(|i| format!("198.51.100.{i}")).collect();
    let many = serde_json::to_vec(&serde_json::json!({ "targets": many })).unwrap();
    broker
        .publish_many([
            (key.clone(), request(1), props("before")),
            (key.clone(), big, props("too-big")),
            (key.clone(), many, props("too-many")),
            (key.clone(), request(2), props("after")),
        ])
        .await;
    let dlq = format!("{}.dlq", broker.config.queue);
    until("two dead letters", Duration::from_secs(30), async || broker.depth(&dlq).await >= 2).await;
    until("the two good scans", Duration::from_secs(30), async || scan_count(&db).await >= 2).await;
    assert_one_scan_each(&db, &["before".to_string(), "after".to_string()].into()).await;
    let reasons = dead_letter_reasons(&broker).await;
    assert_eq!(reasons[0].0, "too-big");
    let limit = format!("over the maximum of {}", portfleet_controller::ingress::DEFAULT_MAX_MESSAGE_BYTES);
    assert!(reasons[0].1.contains(&limit), "{}", reasons[0].1);
    assert_eq!(reasons[1].0, "too-many");
    assert!(reasons[1].1.contains("more than the maximum of 100 targets"), "{}", reasons[1].1);
}

/// Hostnames resolve outside the batch other requests wait on: a request
/// whose names resolve slowly does not delay a one-address request
/// published right behind it; a request's lookups have a deadline and a
/// cap. The controller runs with its own /etc/resolv.conf naming a DNS
/// server of this test (a private mount namespace: root, as CI runs).
#[tokio::test]
async fn slow_hostnames_never_hold_up_other_requests() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let dns = portfleet_tests::dns::DnsServer::start(Duration::from_secs(3)).await;
    let logs = tempfile::tempdir().unwrap();
    let listen = format!("127.0.0.1:{}", portfleet_tests::procs::free_port("127.0.0.1".parse().unwrap()));
    let c = &broker.config;
    let mut cmd = dns.command(&portfleet_tests::binary("portfleet-controller"));
    cmd.args(["serve", "--insecure", "--database-url", db.url(), "--listen", &listen])
        .args(["--allow", "198.51.100.0/24"])
        .args(broker.controller_args())
        .args(["--resolve-deadline", "4s", "--max-scan-hostnames", "50"]);
    let naabum8 = c.naabum8.as_ref().unwrap();
    cmd.args(["--naabum8", "--naabum8-exchange", &naabum8.exchange, "--naabum8-queue", &naabum8.queue]);
    let _controller = portfleet_tests::procs::Proc::spawn_command("controller", cmd, &logs);
    broker.wait_ready().await;
    let key = c.routing_key.clone();
    let names = |n: usize, tag: &str| -> Vec<u8> {
        let targets: Vec<String> = (0..n).map(|i| format!("h{i}-{tag}.slow.test")).collect();
        serde_json::to_vec(&serde_json::json!({ "targets": targets, "ports": "80" })).unwrap()
    };
    // 40 names at 3 s each, 32 at a time: 6 s, past the 4 s deadline.
    let one_name = serde_json::to_vec(&serde_json::json!({ "targets": ["one.slow.test"], "ports": "80" })).unwrap();
    broker
        .publish_many([
            (key.clone(), names(40, "a"), props("slow")),
            (key.clone(), request(1), props("fast")),
            (key.clone(), names(51, "b"), props("too-many-names")),
            (key.clone(), one_name, props("one-name")),
        ])
        .await;
    let t0 = std::time::Instant::now();
    until("the fast request's scan", Duration::from_secs(30), async || {
        request_ids(&db).await.contains(&"fast".to_string())
    })
    .await;
    let fast = t0.elapsed();
    assert!(fast < Duration::from_secs(2), "the one-address request waited {fast:?} behind the slow names");
    until("the named request's scan", Duration::from_secs(30), async || {
        request_ids(&db).await.contains(&"one-name".to_string())
    })
    .await;
    let dlq = format!("{}.dlq", c.queue);
    until("two dead letters", Duration::from_secs(30), async || broker.depth(&dlq).await >= 2).await;
    let reasons = dead_letter_reasons(&broker).await;
    assert_eq!(reasons[0].0, "slow");
    assert!(reasons[0].1.contains("were not all resolved within 4s"), "{}", reasons[0].1);
    assert_eq!(reasons[1].0, "too-many-names");
    assert!(reasons[1].1.contains("51 hostnames exceed the maximum of 50"), "{}", reasons[1].1);
    let mut conn = db.connect().await;
    let host: String = sqlx::query_scalar("SELECT hostname FROM scan_hosts").fetch_one(&mut conn).await.unwrap();
    assert_eq!(host, "one.slow.test");
}
