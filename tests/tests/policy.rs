//! The controller's scope policy over real gRPC and RabbitMQ against a real
//! Postgres: nothing is scannable until allowed, deny wins, the built-in
//! deny-list and the controller's own addresses hold against a broad
//! allow, the first offending range is named, and AMQP scans pass the same
//! check. (The agent's own policy is tested end to end in sessions.rs.)

use std::time::Duration;

use portfleet_controller::{ControllerConfig, store::CapsUpdate};
use portfleet_core::policy::parse_cidrs;
use portfleet_proto::v1 as pb;
use portfleet_tests::{
    TestController, TestDb,
    amqp::{TestBroker, dead_letter_reason, until},
};
use tonic::Code;

/// A controller config whose scope policy allows `cidrs`.
fn allowing(db: &TestDb, cidrs: &str) -> ControllerConfig {
    let mut config = ControllerConfig::new(db.options());
    config.policy.allow = parse_cidrs(cidrs).unwrap();
    config
}

fn scan(targets: &[&str]) -> pb::CreateScanRequest {
    pb::CreateScanRequest {
        targets: targets.iter().map(|t| t.to_string()).collect(),
        ports: "80".into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn nothing_is_scannable_until_allowed() {
    let db = TestDb::create().await;
    let c = TestController::start(ControllerConfig::new(db.options())).await;
    let err = c.client().await.create_scan(scan(&["198.51.100.1"])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("198.51.100.1") && err.message().contains("allows nothing"), "{}", err.message());
}

#[tokio::test]
async fn scans_outside_the_allow_list_are_refused_naming_the_first_offending_range() {
    let db = TestDb::create().await;
    let mut config = allowing(&db, "198.51.100.0/24,203.0.113.0/24");
    config.policy.deny = parse_cidrs("203.0.113.128/25").unwrap();
    let c = TestController::start(config).await;
    let mut api = c.client().await;
    api.create_scan(scan(&["198.51.100.0/24", "203.0.113.0/25"])).await.unwrap();
    let refused = |targets: &'static [&'static str], needle: &'static str| {
        let c = &c;
        async move {
            let err = c.client().await.create_scan(scan(targets)).await.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{targets:?}: {err:?}");
            assert!(err.message().contains(needle), "{targets:?}: {}", err.message());
        }
    };
    refused(&["198.51.100.0/23"], "198.51.101.0-198.51.101.255").await;
    refused(&["198.51.100.7", "192.0.2.0/30"], "192.0.2.0-192.0.2.3").await;
    // Deny wins over allow.
    refused(&["203.0.113.0/24"], "203.0.113.128-203.0.113.255").await;
    // Ranges and IPv6 too.
    refused(&["198.51.100.250-198.51.101.5"], "198.51.101.0-198.51.101.5").await;
    refused(&["2001:db8::1"], "2001:db8::1").await;
    // Nothing was stored for the refused ones.
    let listed = api.list_scans(pb::ListScansRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.scans.len(), 1);
}

#[tokio::test]
async fn loopback_and_own_addresses_need_an_explicit_allow() {
    let db = TestDb::create().await;
    let c = TestController::start(allowing(&db, "0.0.0.0/0,::/0")).await;
    let mut api = c.client().await;
    for target in ["127.0.0.1", "::1", "169.254.1.1", "224.0.0.1", "localhost"] {
        let err = api.create_scan(scan(&[target])).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{target}: {err:?}");
    }
    // This host's own (non-loopback) addresses.
    for own in portfleet_controller::policy::own_addresses() {
        let ip = own.addr();
        if ip.is_loopback() || matches!(ip, std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80) {
            continue;
        }
        let err = api.create_scan(scan(&[&ip.to_string()])).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "own address {ip}: {err:?}");
    }
    drop(c);

    // An allow inside the built-in deny-list opts that range in.
    let db = TestDb::create().await;
    let c = TestController::start(allowing(&db, "0.0.0.0/0,127.0.0.1/32")).await;
    c.client().await.create_scan(scan(&["127.0.0.1"])).await.unwrap();
    let err = c.client().await.create_scan(scan(&["127.0.0.2"])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}

/// A refusal names the rule that refused: "allows nothing yet" only while
/// there is no allow rule, never because a deny covers every allow.
#[tokio::test]
async fn a_refusal_names_the_rule_that_refused_it() {
    let db = TestDb::create().await;
    let c = TestController::start(allowing(&db, "127.0.0.1/32,198.51.100.0/24")).await;
    let mut api = c.client().await;
    api.create_scan(scan(&["127.0.0.1"])).await.unwrap();
    // An admin adds a deny (the CLI's `policy --deny`).
    api.update_scope_policy(pb::UpdateScopePolicyRequest {
        add_deny: vec!["127.0.0.1/32".into(), "198.51.100.128/25".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let refusal = |targets: &'static [&'static str]| {
        let mut api = api.clone();
        async move {
            let err = api.create_scan(scan(targets)).await.unwrap_err();
            assert_eq!(err.code(), Code::PermissionDenied, "{targets:?}: {err:?}");
            assert!(!err.message().contains("allows nothing"), "{}", err.message());
            err.message().to_string()
        }
    };
    assert_eq!(
        refusal(&["127.0.0.1"]).await,
        "targets: 127.0.0.1 may not be scanned: it is denied by the rule deny 127.0.0.1/32"
    );
    assert_eq!(
        refusal(&["198.51.100.0/24"]).await,
        "targets: 198.51.100.128-198.51.100.255 may not be scanned: 198.51.100.128 is denied by the rule \
         deny 198.51.100.128/25"
    );
    let outside = refusal(&["203.0.113.5"]).await;
    assert!(outside.contains("203.0.113.5") && outside.contains("outside every allow rule"), "{outside}");
    // Allowed broadly, loopback is still the built-in deny-list's.
    c.client()
        .await
        .update_scope_policy(pb::UpdateScopePolicyRequest { add_allow: vec!["0.0.0.0/0".into()], ..Default::default() })
        .await
        .unwrap();
    let builtin = refusal(&["127.0.0.2"]).await;
    assert!(builtin.contains("it is in the built-in deny-list (127.0.0.0/8)"), "{builtin}");

    // Every allow rule removed: now nothing is allowed, and it says so.
    api.update_scope_policy(pb::UpdateScopePolicyRequest {
        remove_allow: vec!["127.0.0.1/32".into(), "198.51.100.0/24".into(), "0.0.0.0/0".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let err = api.create_scan(scan(&["198.51.100.1"])).await.unwrap_err();
    assert!(err.message().contains("allows nothing yet"), "{}", err.message());
}

#[tokio::test]
async fn amqp_scans_pass_the_same_policy() {
    let db = TestDb::create().await;
    let broker = TestBroker::new().await;
    let mut config = allowing(&db, "198.51.100.0/24");
    config.ingress = Some(broker.config.clone());
    let _c = TestController::start(config).await;
    broker.wait_ready().await;
    let key = broker.config.routing_key.clone();
    for (id, target) in [("inside", "198.51.100.9"), ("outside", "203.0.113.9")] {
        let body = format!(r#"{{"targets":["{target}"],"ports":"80"}}"#);
        let props = lapin::BasicProperties::default().with_message_id(id.into()).with_delivery_mode(2);
        broker.publish(&broker.config.exchange, &key, body.as_bytes(), props).await;
    }
    let dlq = format!("{}.dlq", broker.config.queue);
    until("the refused request dead-lettered", Duration::from_secs(20), async || broker.depth(&dlq).await == 1).await;
    let dead = broker.drain(&dlq).await;
    let m = &dead[0];
    assert_eq!(m.delivery.properties.message_id().as_ref().unwrap().as_str(), "outside");
    let reason = dead_letter_reason(m);
    assert!(reason.contains("203.0.113.9") && reason.contains("may not be scanned"), "{reason}");
    let mut conn = db.connect().await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT request_id FROM scans").fetch_all(&mut conn).await.unwrap();
    assert_eq!(ids, vec!["inside".to_string()]);
}

#[tokio::test]
async fn a_policy_change_fails_the_scans_it_puts_out_of_scope() {
    let db = TestDb::create().await;
    let c = TestController::start(allowing(&db, "198.51.100.0/24,203.0.113.0/24")).await;
    let mut api = c.client().await;
    let keep = api.create_scan(scan(&["198.51.100.0/25"])).await.unwrap().into_inner();
    let doomed = api.create_scan(scan(&["203.0.113.0/25"])).await.unwrap().into_inner();
    let bad = api
        .update_scope_policy(pb::UpdateScopePolicyRequest {
            add_deny: vec!["192.0.2.0/33".into()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("add_deny"), "{}", bad.message());
    let r = api
        .update_scope_policy(pb::UpdateScopePolicyRequest {
            remove_allow: vec!["203.0.113.0/24".into()],
            add_deny: vec!["198.51.100.200/32".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.failed_scan_ids, vec![doomed.id.clone()]);
    let p = r.policy.unwrap();
    assert_eq!(p.allow, vec!["198.51.100.0/24".to_string()]);
    assert_eq!(p.deny, vec!["198.51.100.200/32".to_string()]);
    assert!(p.builtin_deny.contains(&"127.0.0.0/8".to_string()));
    let failed = api.get_scan(pb::GetScanRequest { id: doomed.id }).await.unwrap().into_inner();
    assert_eq!(failed.state, pb::ScanState::Failed as i32);
    assert!(failed.error.contains("scope policy changed"), "{}", failed.error);
    let kept = api.get_scan(pb::GetScanRequest { id: keep.id }).await.unwrap().into_inner();
    assert_eq!(kept.state, pb::ScanState::Pending as i32);
    // New scans see the change at once on this controller.
    let err = api.create_scan(scan(&["203.0.113.5"])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = api.create_scan(scan(&["198.51.100.200"])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    let got = api.get_scope_policy(pb::GetScopePolicyRequest {}).await.unwrap().into_inner();
    assert_eq!(got.allow, p.allow);
}

#[tokio::test]
async fn politeness_caps_are_seeded_at_start_and_changed_by_admins() {
    let db = TestDb::create().await;
    let mut config = ControllerConfig::new(db.options());
    config.rate_caps = CapsUpdate { per_host: Some(50), per_block: Some(2000) };
    let c = TestController::start(config).await;
    let mut api = c.client().await;
    let caps = |p: pb::ScopePolicy| (p.max_rate_per_host, p.max_rate_per_block);
    assert_eq!(caps(api.get_scope_policy(pb::GetScopePolicyRequest {}).await.unwrap().into_inner()), (50, 2000));
    // A bad request changes nothing, caps included.
    let bad = pb::UpdateScopePolicyRequest {
        add_allow: vec!["nonsense".into()],
        max_rate_per_host: Some(1),
        ..Default::default()
    };
    assert_eq!(api.update_scope_policy(bad).await.unwrap_err().code(), Code::InvalidArgument);
    let lifted = pb::UpdateScopePolicyRequest { max_rate_per_block: Some(0), ..Default::default() };
    let r = api.update_scope_policy(lifted).await.unwrap().into_inner();
    assert_eq!(caps(r.policy.unwrap()), (50, 0), "only the cap asked for changed");
    c.stop().await.unwrap();
    // A controller started without cap flags keeps the database's caps.
    let c = TestController::start(ControllerConfig::new(db.options())).await;
    let got = c.client().await.get_scope_policy(pb::GetScopePolicyRequest {}).await.unwrap().into_inner();
    assert_eq!(caps(got), (50, 0));
}

#[tokio::test]
async fn a_policy_change_binds_every_controller_at_once() {
    let db = TestDb::create().await;
    let config = || allowing(&db, "198.51.100.0/24");
    let (a, b) = (TestController::start(config()).await, TestController::start(config()).await);
    let (mut api_a, mut api_b) = (a.client().await, b.client().await);
    // B has read (and caches) the policy.
    api_b.create_scan(scan(&["198.51.100.1"])).await.unwrap();
    api_a
        .update_scope_policy(pb::UpdateScopePolicyRequest {
            add_deny: vec!["198.51.100.128/25".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    // Within B's cache lifetime: B must not store a scan its cached rules
    // allow, or it would escape the change's sweep of active scans.
    let err = api_b.create_scan(scan(&["198.51.100.200"])).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{}", err.message());
    api_b.create_scan(scan(&["198.51.100.2"])).await.expect("still allowed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_shows_and_changes_the_policy() {
    let db = TestDb::create().await;
    let c = TestController::start(allowing(&db, "198.51.100.0/24")).await;
    let url = c.url();
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(portfleet_tests::binary("portfleet"))
            .args(["--controller", &url, "--token", &c.token, "policy"])
            .args(args)
            .output()
            .unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr))
    };
    let (ok, shown) = cli(&[]);
    let line = |label: &str| shown.lines().find(|l| l.starts_with(label)).unwrap_or_default().to_string();
    assert!(ok && line("allow:").contains("198.51.100.0/24") && line("per block:").contains("no cap"), "{shown}");
    // Built-in denials and this host's addresses are two lists, no entry twice.
    assert!(line("built-in deny:").contains("127.0.0.0/8"), "{shown}");
    assert!(!line("this host:").is_empty(), "{shown}");
    for entry in line("built-in deny:").split(": ").nth(1).unwrap_or_default().split(", ") {
        assert!(!line("this host:").contains(&format!(" {entry}")), "{entry} twice: {shown}");
    }
    let (ok, changed) = cli(&["--deny", "198.51.100.128/25", "--max-rate-per-block", "2000"]);
    assert!(ok && changed.contains("198.51.100.128/25") && changed.contains("2000 probes/s"), "{changed}");
    let (ok, bad) = cli(&["--allow", "not-a-cidr"]);
    assert!(!ok && bad.contains("InvalidArgument"), "{bad}");
    let got = c.client().await.get_scope_policy(pb::GetScopePolicyRequest {}).await.unwrap().into_inner();
    assert_eq!((got.deny, got.max_rate_per_block), (vec!["198.51.100.128/25".to_string()], 2000));
}

/// An IPv4-mapped IPv6 address is the IPv4 host by another name: rules
/// written either way hold for targets written either way, and the
/// built-in and own-address denials hold against the mapped spelling.
#[tokio::test]
async fn mapped_addresses_meet_the_same_rules_as_their_ipv4_selves() {
    let db = TestDb::create().await;
    let mut config = allowing(&db, "::ffff:198.51.100.0/120,::ffff:0:0/96");
    config.policy.deny = parse_cidrs("198.51.100.77,::ffff:203.0.113.0/120").unwrap();
    let c = TestController::start(config).await;
    let mut api = c.client().await;
    let refused = async |target: &str, needle: &str| {
        let err = c.client().await.create_scan(scan(&[target])).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{target}: {err:?}");
        assert!(err.message().contains(needle), "{target}: {}", err.message());
    };
    refused("::ffff:198.51.100.77", "198.51.100.77").await;
    refused("198.51.100.77", "198.51.100.77").await;
    refused("::ffff:198.51.100.64/122", "198.51.100.77").await;
    refused("203.0.113.5", "203.0.113.5").await;
    refused("::ffff:203.0.113.5", "203.0.113.5").await;
    // Loopback (also an own address) stays refused by its mapped name.
    refused("::ffff:127.0.0.1", "127.0.0.1").await;
    // What is allowed is stored in IPv4 form, whatever the spelling.
    let ok = api.create_scan(scan(&["::ffff:198.51.100.9"])).await.unwrap().into_inner();
    let mut conn = db.connect().await;
    let ranges: Vec<String> = sqlx::query_scalar("SELECT unnest(address_ranges) FROM scans WHERE id = $1::uuid")
        .bind(&ok.id)
        .fetch_all(&mut conn)
        .await
        .unwrap();
    assert_eq!(ranges, ["198.51.100.9"]);
    let policy = api.get_scope_policy(pb::GetScopePolicyRequest {}).await.unwrap().into_inner();
    assert!(policy.allow.contains(&"198.51.100.0/24".to_string()), "{:?}", policy.allow);
    assert!(policy.deny.contains(&"203.0.113.0/24".to_string()), "{:?}", policy.deny);
}
