//! Fair share between scans: a one-host scan created while a large scan
//! holds every agent slot gets the next free slot (not the large scan's
//! next shard), both finish with their exact results, scans of one priority
//! take turns, one of priority 10 gets twice the shards of one of 5, and
//! `max_parallel_shards` / `max_agents` bound a scan. The agents are
//! protocol doubles (`FakeAgent`): nothing is probed.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use portfleet_proto::v1 as pb;
use portfleet_tests::{TestController, TestDb, fake_agent::FakeAgent};
use tonic::Code;

/// 256 addresses x 1024 ports: 16 shards of 16,384 positions.
const LARGE: (&str, &str) = ("198.51.100.0/24", "1-1024");

async fn create(c: &TestController, targets: &str, ports: &str, priority: Option<u32>) -> pb::Scan {
    create_with(
        c,
        pb::CreateScanRequest {
            targets: vec![targets.into()],
            ports: ports.into(),
            priority,
            identify: Some(false),
            ..Default::default()
        },
    )
    .await
}

async fn create_with(c: &TestController, req: pb::CreateScanRequest) -> pb::Scan {
    c.client().await.create_scan(req).await.expect("create scan").into_inner()
}

fn scan_of(a: &pb::Assign) -> String {
    a.scan.as_ref().expect("scan parameters").scan_id.clone()
}

async fn assigned(agent: &mut FakeAgent) -> pb::Assign {
    agent.assigned(Duration::from_secs(10)).await.expect("an Assign within 10 s")
}

async fn state(c: &TestController, id: &str) -> pb::Scan {
    c.client().await.get_scan(pb::GetScanRequest { id: id.into() }).await.unwrap().into_inner()
}

async fn results(c: &TestController, id: &str) -> Vec<(IpAddr, u32)> {
    let r = pb::ListResultsRequest { scan_id: id.into(), page_size: 1000, ..Default::default() };
    let page = c.client().await.list_results(r).await.unwrap().into_inner();
    let mut got: Vec<(IpAddr, u32)> = page.results.iter().map(|r| (r.ip.parse().unwrap(), r.port)).collect();
    got.sort();
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_host_scan_starts_while_a_large_scan_holds_every_slot() {
    let db = TestDb::create().await;
    let c = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let mut agents = [FakeAgent::connect(&c, "a").await, FakeAgent::connect(&c, "b").await];
    let large = create(&c, LARGE.0, LARGE.1, None).await;
    assert_eq!(large.shard_count, 16);
    let mut held = Vec::new();
    for agent in &mut agents {
        let a = assigned(agent).await;
        assert_eq!(scan_of(&a), large.id);
        held.push(a);
    }
    // Every slot is the large scan's now.
    let small = create(&c, "203.0.113.7", "80,443", None).await;
    // The next free slot goes to the small scan, not to the large scan's
    // third shard (first in, first out would give it that).
    agents[0].finish(&held[0], &[]).await;
    let next = assigned(&mut agents[0]).await;
    assert_eq!(scan_of(&next), small.id, "the small scan waited behind the large one");
    let small_hit: IpAddr = "203.0.113.7".parse().unwrap();
    agents[0].finish(&next, &[(small_hit, 443)]).await;
    portfleet_tests::eventually("the small scan to complete", Duration::from_secs(10), || async {
        (state(&c, &small.id).await.state == pb::ScanState::Completed as i32).then_some(())
    })
    .await;
    assert_eq!(results(&c, &small.id).await, vec![(small_hit, 443)]);

    // The large scan runs to its end on both agents, exactly.
    let mut current = [Some(assigned(&mut agents[0]).await), Some(held.remove(1))];
    let mut seen = std::collections::BTreeSet::new();
    seen.insert(held[0].shard_id);
    loop {
        let mut idle = 0;
        for (i, agent) in agents.iter_mut().enumerate() {
            let Some(a) = current[i].take() else {
                idle += 1;
                continue;
            };
            assert_eq!(scan_of(&a), large.id);
            assert!(seen.insert(a.shard_id), "shard {} assigned twice", a.shard_id);
            agent.finish(&a, &[]).await;
            current[i] = agent.assigned(Duration::from_secs(3)).await;
        }
        if idle == agents.len() {
            break;
        }
    }
    assert_eq!(seen.len(), 16, "every shard of the large scan ran once");
    portfleet_tests::eventually("the large scan to complete", Duration::from_secs(10), || async {
        (state(&c, &large.id).await.state == pb::ScanState::Completed as i32).then_some(())
    })
    .await;
    assert_eq!(results(&c, &large.id).await, vec![], "nothing was reported open in the large scan");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn equal_priorities_take_turns_and_priority_weighs_the_share() {
    let db = TestDb::create().await;
    let c = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let mut agent = FakeAgent::connect(&c, "solo").await;
    let first = create(&c, LARGE.0, LARGE.1, None).await;
    let second = create(&c, "198.51.101.0/24", LARGE.1, None).await;
    let mut order = Vec::new();
    for _ in 0..8 {
        let a = assigned(&mut agent).await;
        order.push(scan_of(&a));
        agent.finish(&a, &[]).await;
    }
    let turns = order.iter().filter(|id| **id == first.id).count();
    assert_eq!(turns, 4, "equal priorities share one slot evenly: {order:?}");
    assert!(order.windows(2).all(|w| w[0] != w[1]), "they take turns: {order:?}");
    for id in [&first.id, &second.id] {
        c.client().await.cancel_scan(pb::CancelScanRequest { id: id.clone() }).await.unwrap();
    }
    // Drain what the cancels leave in flight.
    while let Some(a) = agent.assigned(Duration::from_secs(2)).await {
        agent.finish(&a, &[]).await;
    }

    let high = create(&c, "198.51.102.0/24", LARGE.1, Some(10)).await;
    let low = create(&c, "198.51.103.0/24", LARGE.1, Some(5)).await;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..12 {
        let a = assigned(&mut agent).await;
        *counts.entry(scan_of(&a)).or_default() += 1;
        agent.finish(&a, &[]).await;
    }
    assert_eq!((counts[&high.id], counts[&low.id]), (8, 4), "priority 10 gets twice the shards of 5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_parallel_shards_and_max_agents_bound_a_scan() {
    let db = TestDb::create().await;
    let c = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let mut agents = Vec::new();
    for name in ["a", "b", "c"] {
        agents.push(FakeAgent::connect(&c, name).await);
    }
    let req = |targets: &str, max_agents, max_parallel_shards| pb::CreateScanRequest {
        targets: vec![targets.into()],
        ports: LARGE.1.into(),
        identify: Some(false),
        max_agents,
        max_parallel_shards,
        ..Default::default()
    };
    let gentle = create_with(&c, req(LARGE.0, 0, 2)).await;
    let mut got = Vec::new();
    for agent in &mut agents {
        got.push(agent.assigned(Duration::from_secs(3)).await);
    }
    assert_eq!(got.iter().filter(|a| a.is_some()).count(), 2, "two shards at once, however many agents");
    let request = create_with(&c, req("198.51.101.0/24", 1, 0)).await;
    let idle = got.iter().position(Option::is_none).unwrap();
    let one = assigned(&mut agents[idle]).await;
    assert_eq!(scan_of(&one), request.id);
    // The busy agents finish the gentle scan's shards: they get its next
    // ones, never the max_agents=1 scan's.
    for (i, a) in got.iter().enumerate() {
        if let Some(a) = a {
            agents[i].finish(a, &[]).await;
            let next = assigned(&mut agents[i]).await;
            assert_eq!(scan_of(&next), gentle.id, "only one agent may work on the max_agents=1 scan");
        }
    }

    // Out of range: a clear InvalidArgument naming the field.
    for (bad, field) in [
        (pb::CreateScanRequest { priority: Some(11), ..req(LARGE.0, 0, 0) }, "priority"),
        (pb::CreateScanRequest { priority: Some(0), ..req(LARGE.0, 0, 0) }, "priority"),
        (req(LARGE.0, 100_001, 0), "max_agents"),
        (req(LARGE.0, 0, 100_001), "max_parallel_shards"),
    ] {
        let e = c.client().await.create_scan(bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(field), "{}", e.message());
    }
    // The normalised request shows the defaults and the limits.
    let got = state(&c, &gentle.id).await.request.unwrap();
    assert_eq!((got.priority, got.max_agents, got.max_parallel_shards), (Some(5), 0, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_scan_joins_level_and_does_not_take_every_slot() {
    let db = TestDb::create().await;
    let c = TestController::start(portfleet_tests::controller_config(db.options())).await;
    let mut agent = FakeAgent::connect(&c, "solo").await;
    // A scan no agent can run keeps the lowest pass of all.
    let stuck = pb::CreateScanRequest {
        targets: vec!["198.51.104.0/24".into()],
        ports: LARGE.1.into(),
        identify: Some(false),
        agent_selector: [("site".to_string(), "nowhere".to_string())].into(),
        ..Default::default()
    };
    create_with(&c, stuck).await;
    let old = create(&c, LARGE.0, LARGE.1, None).await;
    for _ in 0..6 {
        let a = assigned(&mut agent).await;
        assert_eq!(scan_of(&a), old.id);
        agent.finish(&a, &[]).await;
    }
    // The seventh shard of `old` is out; a new scan starts level with the
    // scans being served, not with the stuck one: they take turns.
    let new = create(&c, "198.51.101.0/24", LARGE.1, None).await;
    let mut order = Vec::new();
    for _ in 0..8 {
        let a = assigned(&mut agent).await;
        order.push(if scan_of(&a) == new.id { "new" } else { "old" });
        agent.finish(&a, &[]).await;
    }
    let new_turns = order.iter().filter(|s| **s == "new").count();
    assert!((3..=5).contains(&new_turns), "the new scan took {new_turns} of 8: {order:?}");
}
