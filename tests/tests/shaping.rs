//! Scan shaping: exclusions leave their positions unprobed (counted in the
//! target namespace), hostnames scanned by address family and first
//! address only, CDN edges probed on web ports only and their results
//! named by provider - through the real binaries, a hosts file of the
//! test's and network namespaces; then deadlines and validate-only on an
//! in-process controller with a protocol double for an agent.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use portfleet_proto::{auth::ApiClient, v1 as pb};
use portfleet_tests::{
    TestController, TestDb, dns::HostsFile, eventually, fake_agent::FakeAgent, netns::NetTopology, procs, procs::Proc,
};
use tonic::{Code, transport::Channel};

/// A Cloudflare block (in core/data/cdn-ranges.txt), made live inside the
/// target namespace: nothing leaves the namespaces.
const CDN_BLOCK: &str = "104.16.0.0/29";
const EDGE: &str = "104.16.0.5";

async fn wait_done(api: &mut ApiClient, id: &str) -> pb::Scan {
    eventually("the scan to end", Duration::from_secs(60), || {
        let (mut api, id) = (api.clone(), id.to_string());
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (s.state != pb::ScanState::Pending as i32 && s.state != pb::ScanState::Running as i32).then_some(s)
        }
    })
    .await
}

async fn wait_state(api: &mut ApiClient, id: &str, state: pb::ScanState) -> pb::Scan {
    eventually("the scan's state", Duration::from_secs(10), || {
        let (mut api, id) = (api.clone(), id.to_string());
        async move {
            let s = api.get_scan(pb::GetScanRequest { id }).await.ok()?.into_inner();
            (s.state == state as i32).then_some(s)
        }
    })
    .await
}

async fn results(api: &mut ApiClient, id: &str) -> Vec<pb::Result> {
    let r = pb::ListResultsRequest { scan_id: id.into(), page_size: 1000, ..Default::default() };
    api.list_results(r).await.unwrap().into_inner().results
}

fn open_set(results: &[pb::Result]) -> BTreeSet<(String, u32)> {
    results.iter().map(|r| (r.ip.clone(), r.port)).collect()
}

struct Bench {
    topo: NetTopology,
    db: TestDb,
    logs: tempfile::TempDir,
    _hosts: HostsFile,
    _procs: Vec<Proc>,
    url: String,
}

impl Bench {
    async fn start() -> Option<Self> {
        let topo = NetTopology::create_with_controller_link()?;
        topo.add_live_v4_block(CDN_BLOCK);
        let db = TestDb::create().await;
        let logs = tempfile::tempdir().unwrap();
        let hosts = HostsFile::new(&[
            ("198.18.1.20", "site.test"),
            ("2001:db8:77:1::20", "site.test"),
            ("198.18.1.30", "multi.test"),
            ("198.18.1.31", "multi.test"),
            (EDGE, "edge.test"),
        ]);
        let ip = IpAddr::V4(topo.controller_ip.expect("management link"));
        let port = procs::free_port(ip);
        let mut cmd = hosts.command(&portfleet_tests::binary("portfleet-controller"));
        cmd.args(["serve", "--insecure", "--database-url", db.url(), "--listen", &format!("{ip}:{port}")])
            .args(["--allow", "198.18.0.0/15,2001:db8::/32,104.16.0.0/29", "--no-inventory"])
            .env_remove("DATABASE_URL");
        let controller = Proc::spawn_command("controller", cmd, &logs);
        let url = format!("http://{ip}:{port}");
        let agent = procs::agent(&topo, "agent", &url, &[], &logs);
        Some(Self { topo, db, logs, _hosts: hosts, _procs: vec![controller, agent], url })
    }

    async fn client(&self) -> ApiClient {
        let url = self.url.clone();
        let channel = eventually("the controller to answer", Duration::from_secs(30), || {
            let url = url.clone();
            async move { Channel::from_shared(url).ok()?.connect().await.ok() }
        })
        .await;
        let token = self.db.token(portfleet_controller::auth::Scope::Admin).await;
        let api = portfleet_proto::auth::client(channel, portfleet_proto::auth::Bearer::new(&token).unwrap());
        eventually("the agent connected", Duration::from_secs(30), || {
            let mut api = api.clone();
            async move {
                let agents = api.list_agents(pb::ListAgentsRequest::default()).await.ok()?.into_inner().agents;
                agents.iter().any(|a| a.state == pb::AgentState::Connected as i32).then_some(())
            }
        })
        .await;
        api
    }

    /// Runs a scan and returns it done, its results and how many probes
    /// the target answered with a RST (each probe of a closed port).
    async fn run(&self, api: &mut ApiClient, req: pb::CreateScanRequest) -> (pb::Scan, Vec<pb::Result>, u64) {
        let before = self.topo.target_out_rsts();
        let scan = api.create_scan(req).await.expect("create scan").into_inner();
        let done = wait_done(api, &scan.id).await;
        assert_eq!(done.state, pb::ScanState::Completed as i32, "{done:?}\n{}", self.log());
        let found = results(api, &scan.id).await;
        (done, found, self.topo.target_out_rsts() - before)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("controller.log")).unwrap_or_default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusions_families_first_addresses_and_cdn_edges_end_to_end() {
    let Some(bench) = Bench::start().await else { return };
    let addr = |s: &str| -> SocketAddr { s.parse().unwrap() };
    let _listeners = bench.topo.listen(&[
        addr("198.18.1.3:22"),   // excluded address
        addr("198.18.1.5:8080"), // excluded port
        addr("198.18.1.20:22"),
        addr("[2001:db8:77:1::20]:22"),
        addr("198.18.1.31:22"), // multi.test's second address
        addr("104.16.0.5:80"),
        addr("104.16.0.5:8080"), // a CDN edge's non-web port
    ]);
    let mut api = bench.client().await;

    // Exclusions: 16 addresses less 3, ports 22,80 (8080 excluded): 26
    // probes, every one of a closed port, none of the open ones excluded.
    let (done, found, rsts) = bench
        .run(
            &mut api,
            pb::CreateScanRequest {
                targets: vec!["198.18.1.0/28".into()],
                ports: "22,80,8080".into(),
                exclude: vec!["198.18.1.3".into(), "198.18.1.8-198.18.1.9".into()],
                exclude_ports: "8080".into(),
                identify: Some(false),
                ..Default::default()
            },
        )
        .await;
    assert!(found.is_empty(), "an excluded position was probed: {found:?}");
    assert_eq!(rsts, 26, "probes that reached the target");
    assert_eq!(done.address_count, 13);
    assert_eq!(done.port_count, 2);
    assert_eq!(done.probes_planned, 26);
    let echoed = done.request.unwrap();
    assert_eq!(echoed.exclude, vec!["198.18.1.3", "198.18.1.8-198.18.1.9"]);
    assert_eq!(echoed.exclude_ports, "8080");

    // Hostnames: IPv4 only, the first address of each name, the CDN edge
    // on web ports only (80; 443 not asked for).
    let hosts_req = pb::CreateScanRequest {
        targets: vec!["site.test".into(), "multi.test".into(), "edge.test".into()],
        ports: "22,80,8080".into(),
        ip_version: pb::IpVersion::IpVersion4 as i32,
        scan_all_ips: Some(false),
        cdn_policy: pb::CdnPolicy::WebPorts as i32,
        identify: Some(false),
        ..Default::default()
    };
    let plan =
        api.create_scan(pb::CreateScanRequest { validate_only: true, ..hosts_req.clone() }).await.unwrap().into_inner();
    let p = plan.plan.clone().expect("a plan");
    assert!(plan.id.is_empty());
    assert_eq!(p.probes, 7, "{p:?}");
    assert_eq!(p.address_count, 3);
    assert_eq!(p.cdn.len(), 1);
    assert_eq!((p.cdn[0].address.as_str(), p.cdn[0].provider.as_str()), (EDGE, "cloudflare"));
    assert!(p.allowed && p.capable_agent_count == 1, "{p:?}");
    let names: Vec<(String, Vec<String>)> =
        p.resolved.iter().map(|n| (n.hostname.clone(), n.addresses.clone())).collect();
    assert_eq!(
        names,
        vec![
            ("edge.test".into(), vec![EDGE.to_string()]),
            ("multi.test".into(), vec!["198.18.1.30".to_string()]),
            ("site.test".into(), vec!["198.18.1.20".to_string()]),
        ]
    );
    let (_, found, rsts) = bench.run(&mut api, hosts_req).await;
    let want: BTreeSet<(String, u32)> = [("198.18.1.20".to_string(), 22), (EDGE.to_string(), 80)].into();
    assert_eq!(open_set(&found), want);
    assert_eq!(rsts, 5, "7 probes, 2 of them open");
    let edge = found.iter().find(|r| r.ip == EDGE).unwrap();
    assert_eq!(edge.cdn, "cloudflare");
    assert!(found.iter().find(|r| r.ip == "198.18.1.20").unwrap().cdn.is_empty());

    // IPv6 only: the name's AAAA, every address (both of multi.test).
    let (_, found, _) = bench
        .run(
            &mut api,
            pb::CreateScanRequest {
                targets: vec!["site.test".into()],
                ports: "22".into(),
                ip_version: pb::IpVersion::IpVersion6 as i32,
                identify: Some(false),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(open_set(&found), [("2001:db8:77:1::20".to_string(), 22)].into());
    let (_, found, _) = bench
        .run(
            &mut api,
            pb::CreateScanRequest {
                targets: vec!["multi.test".into()],
                ports: "22".into(),
                identify: Some(false),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(open_set(&found), [("198.18.1.31".to_string(), 22)].into());

    // Refusals naming the field: a name without an address of the family,
    // a scan left with nothing once CDN edges are skipped.
    let err = api
        .create_scan(pb::CreateScanRequest {
            targets: vec!["edge.test".into()],
            ip_version: pb::IpVersion::IpVersion6 as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("has no IPv6 addresses"), "{}", err.message());
    let err = api
        .create_scan(pb::CreateScanRequest {
            targets: vec!["edge.test".into()],
            cdn_policy: pb::CdnPolicy::Skip as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("cdn_policy:"), "{}", err.message());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validate_only_plans_without_storing_and_bad_shaping_is_refused() {
    let db = TestDb::create().await;
    let mut cfg = portfleet_tests::controller_config(db.options());
    cfg.policy.deny = portfleet_core::policy::parse_cidrs("203.0.113.0/24").unwrap();
    let c = TestController::start(cfg).await;
    let _agent = FakeAgent::connect(&c, "planner").await;
    let mut api = c.client().await;
    let dry = |targets: &[&str], ports: &str| pb::CreateScanRequest {
        targets: targets.iter().map(|t| t.to_string()).collect(),
        ports: ports.into(),
        rate: 100,
        retries: Some(0),
        validate_only: true,
        ..Default::default()
    };
    let scan = api
        .create_scan(pb::CreateScanRequest {
            exclude: vec!["198.51.100.0/26".into()],
            ..dry(&["198.51.100.0/24"], "80,443")
        })
        .await
        .unwrap()
        .into_inner();
    let p = scan.plan.expect("plan");
    assert_eq!(p.address_count, 192);
    assert_eq!(p.excluded_addresses, 64);
    assert_eq!(p.probes, 384);
    assert!(p.shard_count >= 1);
    assert!(p.allowed && p.policy_verdict.is_empty());
    assert_eq!(p.capable_agents, vec!["planner".to_string()]);
    // 384 probes at 100/s.
    let est = p.estimated_duration.unwrap();
    assert!((3..=4).contains(&est.seconds), "{est:?}");
    // The policy's verdict names the range; nothing is stored either way.
    let refused = api.create_scan(dry(&["203.0.113.9"], "80")).await.unwrap().into_inner().plan.unwrap();
    assert!(!refused.allowed);
    assert!(refused.policy_verdict.contains("203.0.113.9"), "{}", refused.policy_verdict);
    let stored = api.list_scans(pb::ListScansRequest::default()).await.unwrap().into_inner();
    assert!(stored.scans.is_empty(), "validate_only stored a scan");

    let refuse = |req: pb::CreateScanRequest, field: &'static str| {
        let mut api = api.clone();
        async move {
            let err = api.create_scan(req).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            assert!(err.message().starts_with(field), "{field}: {}", err.message());
        }
    };
    let base =
        || pb::CreateScanRequest { targets: vec!["198.51.100.0/30".into()], ports: "80".into(), ..Default::default() };
    refuse(pb::CreateScanRequest { exclude: vec!["198.51.100.0/24".into()], ..base() }, "exclude:").await;
    refuse(pb::CreateScanRequest { exclude: vec!["db.example".into()], ..base() }, "exclude[0]:").await;
    refuse(pb::CreateScanRequest { exclude_ports: "1-1000".into(), ..base() }, "exclude_ports:").await;
    refuse(pb::CreateScanRequest { exclude_ports: "x".into(), ..base() }, "exclude_ports:").await;
    let past = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() - 60, nanos: 0 };
    refuse(pb::CreateScanRequest { deadline: Some(past), ..base() }, "deadline:").await;
    refuse(pb::CreateScanRequest { ip_version: 9, ..base() }, "ip_version:").await;
    c.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_cancels_the_scan_and_keeps_what_it_found() {
    let db = TestDb::create().await;
    let c = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let mut agent = FakeAgent::connect(&c, "slow").await;
    let mut api = c.client().await;
    let deadline = prost_types::Timestamp { seconds: chrono::Utc::now().timestamp() + 3, nanos: 0 };
    let scan = api
        .create_scan(pb::CreateScanRequest {
            targets: vec!["198.51.100.0/24".into()],
            ports: "1-1024".into(),
            identify: Some(false),
            deadline: Some(deadline),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // One shard done with an open port; whatever comes next never
    // finishes.
    let first = agent.assigned(Duration::from_secs(10)).await.expect("an Assign");
    // A position of this shard: the controller takes results only there.
    let (hit, hit_port) = portfleet_tests::fake_agent::space_of(&first).probe_at(first.start_index);
    agent.finish(&first, &[(hit, hit_port)]).await;
    let running = wait_state(&mut api, &scan.id, pb::ScanState::Running).await;
    assert!(!running.deadline_exceeded);
    let done = wait_done(&mut api, &scan.id).await;
    assert_eq!(done.state, pb::ScanState::Cancelled as i32);
    assert!(done.deadline_exceeded);
    assert!(done.error.starts_with("deadline "), "{}", done.error);
    assert!(done.end_time.unwrap().seconds >= deadline.seconds);
    let found = results(&mut api, &scan.id).await;
    assert_eq!(open_set(&found), [(hit.to_string(), u32::from(hit_port))].into());
    assert_eq!(done.request.unwrap().deadline.unwrap().seconds, deadline.seconds);
    c.stop().await.unwrap();
}
