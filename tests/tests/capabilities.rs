//! What an agent tells the controller it can do is true of its host: the
//! real agent binary, in a namespace with routes into global IPv6 space and
//! in one with IPv4 only, read back through ListAgents. Nothing is scanned:
//! the agents only connect.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use portfleet_proto::{
    auth::{ApiClient, Bearer},
    v1 as pb,
};
use portfleet_tests::{
    TestDb, binary,
    netns::{Ipv4OnlyNamespace, NetTopology},
    procs::{self, Proc, free_port},
};
use tonic::transport::Channel;

async fn client(db: &TestDb, url: &str) -> ApiClient {
    let channel = portfleet_tests::eventually("the controller to answer", Duration::from_secs(30), || {
        let url = url.to_string();
        async move { Channel::from_shared(url).ok()?.connect().await.ok() }
    })
    .await;
    let token = db.token(portfleet_controller::auth::Scope::Admin).await;
    portfleet_proto::auth::client(channel, Bearer::new(&token).unwrap())
}

/// Runs a controller on `controller_ip` and the agent `start_agent` starts
/// (given the controller's URL); returns the agent as ListAgents shows it
/// once connected, and the agent's log.
async fn listed_agent(
    controller_ip: Ipv4Addr,
    start_agent: impl FnOnce(&str, &tempfile::TempDir) -> Proc,
) -> (pb::Agent, String) {
    portfleet_tests::init_tracing();
    let db = TestDb::create().await;
    let logs = tempfile::tempdir().unwrap();
    let ip = IpAddr::V4(controller_ip);
    let listen = format!("{ip}:{}", free_port(ip));
    let url = format!("http://{listen}");
    let _controller = procs::controller("controller", db.url(), &listen, &[], &logs);
    let agent = start_agent(&url, &logs);
    let client = client(&db, &url).await;
    let listed = portfleet_tests::eventually("the agent connected", Duration::from_secs(30), || {
        let mut c = client.clone();
        async move {
            let agents = c.list_agents(pb::ListAgentsRequest::default()).await.ok()?.into_inner().agents;
            agents.into_iter().find(|a| a.state == pb::AgentState::Connected as i32)
        }
    })
    .await;
    (listed, agent.log())
}

/// The test topology's scanner namespace routes 2001:db8:77:1::/120 (and
/// has 2001:db8:76::1/64 on its link): IPv6 shards may go there.
#[tokio::test]
async fn an_agent_with_routes_into_global_ipv6_space_offers_ipv6() {
    let Some(topo) = NetTopology::create_with_controller_link() else { return };
    let controller_ip = topo.controller_ip.expect("management link");
    let (agent, log) = listed_agent(controller_ip, |url, logs| procs::agent(&topo, "routed-v6", url, &[], logs)).await;
    assert_eq!(agent.name, "routed-v6");
    assert!(agent.ipv6, "{agent:?}\n{log}");
    assert_eq!(log.matches("ipv6 capability").count(), 1, "{log}");
    assert!(log.contains("2001:db8:"), "the log names the route and address: {log}");
}

/// Loopback and an IPv4 link only: `::1` binds (which the agent used to
/// take as proof), but no IPv6 address outside this host is reachable.
#[tokio::test]
async fn an_agent_with_ipv4_only_does_not_offer_ipv6() {
    let Some(ns) = Ipv4OnlyNamespace::create() else { return };
    let addrs = ns.command("cat").arg("/proc/net/if_inet6").output().expect("read if_inet6");
    let addrs = String::from_utf8_lossy(&addrs.stdout).to_string();
    assert!(addrs.contains("00000000000000000000000000000001"), "::1 is up in the namespace: {addrs}");
    let (agent, log) = listed_agent(ns.controller_ip, |url, logs| {
        let mut cmd = ns.command(binary("portfleet-agent"));
        cmd.args(["run", "--controller", url, "--name", "v4-only", "--state-dir"]).arg(logs.path().join("state"));
        Proc::spawn_command("v4-only", cmd, logs)
    })
    .await;
    assert_eq!(agent.name, "v4-only");
    assert!(!agent.ipv6, "{agent:?}\n{log}");
    assert_eq!(log.matches("ipv6 capability").count(), 1, "{log}");
    assert!(log.contains("no route to global IPv6 space"), "the log says why: {log}");
}
