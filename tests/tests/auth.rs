//! API tokens over real gRPC against a real Postgres: every ScanService
//! RPC with no token, a read, a scan and an admin token gets the exact
//! code; bad, revoked and expired tokens are refused; only hashes are
//! stored.

use std::time::Duration;

use portfleet_controller::auth::{self, Scope};
use portfleet_proto::{auth::ApiClient, v1 as pb};
use portfleet_tests::{TestController, TestDb};
use sqlx::Row;
use tonic::Code;

/// Calls one RPC with a well-formed request; returns its status code.
async fn call(c: &mut ApiClient, rpc: &str, scan_id: &str) -> Code {
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let id = scan_id.to_string();
    match rpc {
        "CreateTargets" => code(
            c.create_targets(pb::CreateTargetsRequest {
                targets: vec![pb::Target { value: "198.51.100.9".into(), ..Default::default() }],
            })
            .await
            .map(drop),
        ),
        "ListTargets" => code(c.list_targets(pb::ListTargetsRequest::default()).await.map(drop)),
        "DeleteTarget" => {
            code(c.delete_target(pb::DeleteTargetRequest { id: uuid::Uuid::new_v4().to_string() }).await.map(drop))
        }
        "CreateScan" => code(
            c.create_scan(pb::CreateScanRequest {
                targets: vec!["198.51.100.1".into()],
                ports: "80".into(),
                ..Default::default()
            })
            .await
            .map(drop),
        ),
        "GetScan" => code(c.get_scan(pb::GetScanRequest { id }).await.map(drop)),
        "ListScans" => code(c.list_scans(pb::ListScansRequest::default()).await.map(drop)),
        "CancelScan" => code(c.cancel_scan(pb::CancelScanRequest { id }).await.map(drop)),
        "ListResults" => {
            code(c.list_results(pb::ListResultsRequest { scan_id: id, ..Default::default() }).await.map(drop))
        }
        "WatchScan" => code(c.watch_scan(pb::WatchScanRequest { id }).await.map(drop)),
        "ListAgents" => code(c.list_agents(pb::ListAgentsRequest::default()).await.map(drop)),
        "DrainAgent" => {
            code(c.drain_agent(pb::DrainAgentRequest { id: uuid::Uuid::new_v4().to_string() }).await.map(drop))
        }
        "UndrainAgent" => {
            code(c.undrain_agent(pb::UndrainAgentRequest { id: uuid::Uuid::new_v4().to_string() }).await.map(drop))
        }
        "GetScopePolicy" => code(c.get_scope_policy(pb::GetScopePolicyRequest {}).await.map(drop)),
        "UpdateScopePolicy" => code(c.update_scope_policy(pb::UpdateScopePolicyRequest::default()).await.map(drop)),
        other => panic!("unknown rpc {other}"),
    }
}

/// Each RPC and the scope it needs.
const RPCS: &[(&str, Scope)] = &[
    ("CreateTargets", Scope::Scan),
    ("ListTargets", Scope::Read),
    ("DeleteTarget", Scope::Scan),
    ("CreateScan", Scope::Scan),
    ("GetScan", Scope::Read),
    ("ListScans", Scope::Read),
    ("CancelScan", Scope::Scan),
    ("ListResults", Scope::Read),
    ("WatchScan", Scope::Read),
    ("ListAgents", Scope::Admin),
    ("DrainAgent", Scope::Admin),
    ("UndrainAgent", Scope::Admin),
    ("GetScopePolicy", Scope::Admin),
    ("UpdateScopePolicy", Scope::Admin),
];

#[tokio::test]
async fn every_rpc_answers_each_scope_with_the_exact_code() {
    let db = TestDb::create().await;
    let c = TestController::start(portfleet_tests::controller_config(db.options())).await;
    // A scan to name; cancelling it is fine (a second cancel is
    // FAILED_PRECONDITION, which is still not an auth code).
    let scan = c
        .client()
        .await
        .create_scan(pb::CreateScanRequest {
            targets: vec!["198.51.100.7".into()],
            ports: "80".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut none = c.client_with("").await;
    let mut clients = vec![];
    for scope in [Scope::Read, Scope::Scan, Scope::Admin] {
        clients.push((scope, c.client_with(&c.new_token(scope).await).await));
    }
    for (rpc, needs) in RPCS {
        assert_eq!(call(&mut none, rpc, &scan.id).await, Code::Unauthenticated, "{rpc} without a token");
        for (scope, client) in clients.iter_mut() {
            let got = call(client, rpc, &scan.id).await;
            if *scope >= *needs {
                assert!(
                    !matches!(got, Code::Unauthenticated | Code::PermissionDenied),
                    "{rpc} with a {scope:?} token: {got:?}"
                );
            } else {
                assert_eq!(got, Code::PermissionDenied, "{rpc} with a {scope:?} token");
            }
        }
    }
    // Health and reflection stay open.
    let mut health = tonic_health::pb::health_client::HealthClient::new(c.channel().await);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap();
}

#[tokio::test]
async fn bad_revoked_and_expired_tokens_are_refused() {
    let db = TestDb::create().await;
    let c = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let list = async |token: &str| {
        let mut client = c.client_with(token).await;
        client.list_scans(pb::ListScansRequest::default()).await.err().map_or(Code::Ok, |s| s.code())
    };
    let good = c.new_token(Scope::Read).await;
    assert_eq!(list(&good).await, Code::Ok);
    // A right id with a wrong secret, garbage, another scheme.
    let (head, secret) = good.rsplit_once('_').unwrap();
    let flipped: String = secret.chars().rev().collect();
    assert_eq!(list(&format!("{head}_{flipped}")).await, Code::Unauthenticated);
    assert_eq!(list("pft_nonsense").await, Code::Unauthenticated);
    let mut basic = c.client_with("").await;
    let mut req = tonic::Request::new(pb::ListScansRequest::default());
    req.metadata_mut().insert("authorization", format!("Basic {good}").parse().unwrap());
    assert_eq!(basic.list_scans(req).await.unwrap_err().code(), Code::Unauthenticated);

    let store = db.store().await;
    // Revoked before its first use: refused at once (nothing cached).
    let doomed = auth::create_token(&store, "doomed", Scope::Admin, None).await.unwrap();
    assert!(store.revoke_token(doomed.record.id).await.unwrap());
    assert_eq!(list(&doomed.token).await, Code::Unauthenticated);
    // Revoked after use: refused once the cache (5 s) lapses.
    let used = auth::create_token(&store, "used", Scope::Admin, None).await.unwrap();
    assert_eq!(list(&used.token).await, Code::Ok);
    assert!(store.revoke_token(used.record.id).await.unwrap());
    tokio::time::sleep(Duration::from_millis(5200)).await;
    assert_eq!(list(&used.token).await, Code::Unauthenticated);
    // Expired.
    let brief = auth::create_token(&store, "brief", Scope::Admin, Some(Duration::from_secs(1))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(list(&brief.token).await, Code::Unauthenticated);

    // Only hashes are stored: no column holds any token's secret.
    let mut conn = db.connect().await;
    let rows = sqlx::query("SELECT secret_hash FROM api_tokens").fetch_all(&mut conn).await.unwrap();
    let secret_of = |t: &str| t.rsplit_once('_').unwrap().1.to_string();
    for row in rows {
        let hash: Vec<u8> = row.get(0);
        assert_eq!(hash.len(), 32);
        for t in [&good, &doomed.token, &used.token, &brief.token] {
            assert_ne!(hash, secret_of(t).as_bytes());
        }
    }
    store.close().await;
}
