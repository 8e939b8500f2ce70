//! Controller benchmarks with simulated agents (in this process, real gRPC
//! over TCP) against the real controller binary and a real Postgres:
//!
//!   cargo run --release -p portfleet-tests --bin session-bench -- ingest [--results 10000000] [--agents 16]
//!   cargo run --release -p portfleet-tests --bin session-bench -- fleet [--agents 1000] [--scans 100]
//!   cargo run --release -p portfleet-tests --bin session-bench -- caps [--agents 100] [--running 500] [--scans 100]
//!   cargo run --release -p portfleet-tests --bin session-bench -- watch [--watchers 500] [--runs 3] [--agents 4]
//!       [--shard-rate 8000] [--controller PATH] [--client-nice]
//!
//! `ingest`: agents stream result batches (1000 results each, up to 64
//! unacked per lease, as the real agent does); reports results committed
//! per second and the controller's RSS before and after.
//! `fleet`: many idle agents heartbeating; reports the controller's RSS and
//! CPU, then the time from CreateScan to the first Assign, p50 and p99.
//! `caps`: the cost of the politeness caps: with `--running` scans holding
//! leases (each over 20 /24s and 20 addresses of 198.18.0.0/15), CreateScan
//! -> first Assign and the controller's CPU with the caps off, then on, in
//! the same run.
//! `watch`: what WatchScan streams cost the rest: a scan of 2^20 positions
//! (64 shards) reported by simulated agents at a fixed pace per shard, as
//! a real agent sends (a batch every 100 ms, a checkpoint every second,
//! holding while its controller's heartbeat echoes are late), timed from
//! the agents' start to Completed, while GetScan is timed every 10 ms;
//! once with no watcher and once with `--watchers` streams on the scan,
//! alternating, `--runs` times each; prints medians and ratios. The
//! watchers are one child process (`watch-client`, one thread, 100 streams
//! per HTTP/2 connection, 25 per token: under the default caps), so their
//! decoding shows apart; `--client-nice` runs it at nice 19.
//! `--controller PATH` runs another build of the controller binary.
//! `inventory [--results 2000000] [--runs 3] [--inventory-rows 10000000]`:
//! the network memory's costs (docs/inventory.md), each in the same run as
//! its yardstick: ingest with the inventory folded (and how long folding
//! takes to catch up) against ingest with `--no-inventory`, alternating;
//! DiffScans of two scans of 1M results each; GetHost / ListChanges /
//! ListHosts p50 and p99 over an inventory of `--inventory-rows` ports and
//! as many changes; deleting a 1M-result scan while agents ingest, and the
//! ingest rate before and during the delete.
//! `schedules [--schedules 10000]`: the controller's CPU with no schedule
//! and then with `--schedules` loaded but none due, in the same run; then
//! as many schedules of a one-minute interval, created as fast as the API
//! takes them, each timed from its first due time to its run's scan stored
//! (p50, p99, max).
//! Needs `cargo build --release -p portfleet-controller` first.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use portfleet_core::{AddressSet, PortSet, ScanSpace, permutation::Permutation};
use portfleet_proto::v1::{
    self as pb, agent_message::Frame as Out, agent_service_client::AgentServiceClient, controller_message::Frame as In,
};
use portfleet_tests::TestDb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const BATCH: usize = 1000;
const WINDOW: u64 = 64;

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// CPU seconds (user + system) the process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

struct Controller {
    child: std::process::Child,
    url: String,
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_controller(db: &TestDb) -> Controller {
    start_controller_bin(db, None).await
}

async fn start_controller_bin(db: &TestDb, bin: Option<&str>) -> Controller {
    start_controller_with(db, bin, &[]).await
}

/// The controller built next to this bench, or the binary at `bin`.
async fn start_controller_with(db: &TestDb, bin: Option<&str>, extra: &[&str]) -> Controller {
    let exe = std::env::current_exe().unwrap();
    let bin = bin.map_or_else(|| exe.parent().unwrap().join("portfleet-controller"), std::path::PathBuf::from);
    // Every simulated agent connects from 127.0.0.1: lift the per-address
    // connection cap, if this binary has one (an older one, given with
    // --controller, may predate it).
    let help =
        std::process::Command::new(&bin).args(["serve", "--help"]).output().map(|o| o.stdout).unwrap_or_default();
    let own = String::from_utf8_lossy(&help).contains("--max-connections-per-ip");
    assert!(bin.exists(), "build it first: cargo build --release -p portfleet-controller");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut cmd = std::process::Command::new(bin);
    cmd.args([
        "serve",
        "--insecure",
        "--database-url",
        db.url(),
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--db-pool-size",
        "16",
    ])
    .args(["--allow", "198.18.0.0/15,198.51.100.0/24"])
    .env("RUST_LOG", std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()));
    if own {
        cmd.args(["--max-connections-per-ip", "10000"]);
    }
    cmd.args(extra);
    let child = cmd.spawn().unwrap();
    let url = format!("http://127.0.0.1:{port}");
    portfleet_tests::eventually("controller up", Duration::from_secs(30), || {
        let url = url.clone();
        async move { Channel::from_shared(url).ok()?.connect().await.ok() }
    })
    .await;
    Controller { child, url }
}

struct Sim {
    id: String,
    tx: mpsc::Sender<pb::AgentMessage>,
    rx: tonic::Streaming<pb::ControllerMessage>,
}

async fn connect(url: &str, name: &str, max_shards: u32) -> Sim {
    let channel = Channel::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    let (tx, rx) = mpsc::channel(256);
    let id = uuid::Uuid::new_v4().to_string();
    tx.send(pb::AgentMessage {
        frame: Some(Out::Hello(pb::Hello {
            agent_id: id.clone(),
            name: name.into(),
            version: "bench".into(),
            min_protocol_version: 1,
            max_protocol_version: 1,
            capabilities: Some(pb::Capabilities { raw_socket: true, ipv6: true }),
            max_shards,
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut rx = AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await.unwrap().into_inner();
    match rx.message().await.unwrap().and_then(|m| m.frame) {
        Some(In::Welcome(_)) => {}
        other => panic!("no Welcome: {other:?}"),
    }
    Sim { id, tx, rx }
}

fn heartbeat() -> pb::AgentMessage {
    pb::AgentMessage { frame: Some(Out::Heartbeat(pb::Heartbeat::default())) }
}

async fn ingest(args: &[String]) {
    let target = arg(args, "--results", 10_000_000);
    let agents = arg(args, "--agents", 16) as usize;
    let db = TestDb::create().await;
    let ctl = start_controller(&db).await;
    let r = run_ingest(&db, &ctl, target, agents, true).await;
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM results").fetch_one(&mut db.connect().await).await.unwrap();
    println!("ingest: {agents} agents, batches of {BATCH}, up to {WINDOW} unacked per lease");
    println!("  results committed (acked): {}, rows in Postgres: {rows}", r.committed);
    println!("  elapsed: {:.1} s, {:.0} results/s", r.elapsed, r.rate());
    println!(
        "  controller RSS: {:.1} MB before, {:.1} MB peak, change {:.1} MB",
        r.rss_before,
        r.rss_peak,
        r.rss_peak - r.rss_before
    );
    println!("  controller CPU: {:.1} s ({:.0}% of one core)", r.cpu, r.cpu / r.elapsed * 100.0);
    println!(
        "  vs goal >= 100000 results/s: {:.2}x; RSS change vs goal < 50 MB: {:.2}x of the budget",
        r.rate() / 100_000.0,
        (r.rss_peak - r.rss_before) / 50.0
    );
}

/// What one ingest run measured.
struct IngestRun {
    committed: u64,
    elapsed: f64,
    rss_before: f64,
    rss_peak: f64,
    /// Controller CPU seconds spent.
    cpu: f64,
}

impl IngestRun {
    fn rate(&self) -> f64 {
        self.committed as f64 / self.elapsed
    }
}

/// `agents` simulated agents report `target` open ports to `ctl` as fast
/// as it commits them.
async fn run_ingest(db: &TestDb, ctl: &Controller, target: u64, agents: usize, progress: bool) -> IngestRun {
    let pid = ctl.child.id();
    let mut api = admin_client(db, ctl).await;
    // 2^17 addresses x 32767 ports: 4096 shards of ~1M positions, more than
    // enough distinct (ip, port) pairs. Nothing is probed: the agents are
    // simulated and only report.
    let _scan = api
        .create_scan(pb::CreateScanRequest {
            targets: vec!["198.18.0.0/15".into()],
            ports: "1-32767".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let committed = Arc::new(AtomicU64::new(0));
    let rss_before = rss_mb(pid);
    let cpu_before = cpu_secs(pid);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..agents {
        let sim = connect(&ctl.url, &format!("ingest-{i}"), 1).await;
        let committed = committed.clone();
        tasks.push(tokio::spawn(ingest_agent(sim, committed, target)));
    }
    let mut peak = rss_before;
    let mut last_report = Instant::now();
    while committed.load(Ordering::Relaxed) < target {
        tokio::time::sleep(Duration::from_millis(200)).await;
        peak = peak.max(rss_mb(pid));
        if progress && last_report.elapsed() > Duration::from_secs(5) {
            let n = committed.load(Ordering::Relaxed);
            eprintln!(
                "  {n} results committed, {:.0}/s, controller RSS {:.1} MB",
                n as f64 / start.elapsed().as_secs_f64(),
                rss_mb(pid)
            );
            last_report = Instant::now();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    IngestRun {
        committed: committed.load(Ordering::Relaxed),
        elapsed,
        rss_before,
        rss_peak: peak,
        cpu: cpu_secs(pid) - cpu_before,
    }
}

/// The `observability` mode: what metrics (and traces, when the binary
/// exports them) cost, measured in one run against the same controller
/// with them off: result ingest rate and CreateScan latency, alternating
/// off/on runs, medians; then `/metrics` scrapes with `--fleet` simulated
/// agents connected.
async fn observability(args: &[String]) {
    let runs = arg(args, "--runs", 3) as usize;
    let target = arg(args, "--results", 2_000_000);
    let agents = arg(args, "--agents", 8) as usize;
    let creates = arg(args, "--creates", 200) as usize;
    let fleet = arg(args, "--fleet", 1000) as usize;
    // Traces go to a real OTLP receiver in this process.
    let receiver = portfleet_tests::otlp::Receiver::default();
    let otlp = receiver.start(std::net::Ipv4Addr::LOCALHOST.into()).await;
    // `--only metrics` or `--only traces` turns on one of the two.
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let on_flags = |metrics: &str| {
        let mut flags = Vec::new();
        if only.as_deref() != Some("traces") {
            flags.extend(["--metrics-listen", metrics].map(String::from));
        }
        if only.as_deref() != Some("metrics") {
            flags.extend(["--otlp-endpoint", &otlp].map(String::from));
        }
        flags
    };
    let (mut ingest, mut create) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    for run in 0..runs {
        // Alternate which goes first, so drift on a shared machine falls on
        // both alike.
        let order = if run % 2 == 0 { [false, true] } else { [true, false] };
        for on in order {
            let db = TestDb::create().await;
            let metrics = format!("127.0.0.1:{}", free_port());
            let extra = if on { on_flags(&metrics) } else { Vec::new() };
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            let ctl = start_controller_with(&db, None, &extra).await;
            // On a quiet database, before the ingest (whose inventory fold
            // keeps Postgres busy for a while after it).
            let latency = create_latency(&db, &ctl, creates).await;
            let r = run_ingest(&db, &ctl, target, agents, false).await;
            eprintln!(
                "  run {run} metrics and traces {}: ingest {:.0} results/s, CreateScan p50 {latency:.2} ms",
                if on { "on " } else { "off" },
                r.rate()
            );
            ingest[usize::from(on)].push(r.rate());
            create[usize::from(on)].push(latency);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        pct(v, 0.5)
    };
    let (ingest_off, ingest_on) = (median(&mut ingest[0]), median(&mut ingest[1]));
    let (create_off, create_on) = (median(&mut create[0]), median(&mut create[1]));
    println!("observability: metrics and traces on vs off, {runs} runs each way, medians");
    println!("  spans received: {}", receiver.spans().len());
    println!(
        "  result ingest: off {ingest_off:.0}/s, on {ingest_on:.0}/s: {:.2}x (goal >= 0.95x)",
        ingest_on / ingest_off
    );
    println!(
        "  CreateScan p50: off {create_off:.2} ms, on {create_on:.2} ms: {:.2}x of the speed (goal >= 0.95x)",
        create_off / create_on
    );

    // Scrapes with a large fleet connected.
    let db = TestDb::create().await;
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let flags = on_flags(&metrics.to_string());
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ctl = start_controller_with(&db, None, &flags).await;
    let (assigned_tx, _assigned_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    for i in 0..fleet {
        let sim = connect(&ctl.url, &format!("scrape-{i}"), 1).await;
        run_sim(sim, assigned_tx.clone(), |_| false);
    }
    let _ = create_latency(&db, &ctl, 20).await;
    // Heartbeats recorded, the sampler's first pass done.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let mut times = Vec::new();
    let mut size = 0;
    for _ in 0..50 {
        let t = Instant::now();
        let (status, body) = portfleet_tests::http_get(metrics, "/metrics").await.expect("scrape");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        assert_eq!(status, 200);
        size = body.len();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    times.sort_by(f64::total_cmp);
    println!(
        "  /metrics with {fleet} agents connected: p50 {:.2} ms, p99 {:.2} ms, {size} bytes (goal < 20 ms: {:.2}x)",
        pct(&times, 0.5),
        pct(&times, 0.99),
        pct(&times, 0.99) / 20.0
    );
}

fn free_port() -> u16 {
    portfleet_tests::procs::free_port(std::net::Ipv4Addr::LOCALHOST.into())
}

/// Median latency of `n` sequential CreateScan calls for one host and port,
/// in milliseconds. The scans select agents none has (they stay pending:
/// the simulated agents never take them).
async fn create_latency(db: &TestDb, ctl: &Controller, n: usize) -> f64 {
    let mut api = admin_client(db, ctl).await;
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        api.create_scan(pb::CreateScanRequest {
            targets: vec![format!("198.51.100.{}", i % 250 + 1)],
            ports: "443".into(),
            agent_selector: [("bench".to_string(), "latency-only".to_string())].into(),
            ..Default::default()
        })
        .await
        .unwrap();
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    pct(&ms, 0.5)
}

/// Reports every position of each leased shard as an open port, in scan
/// order, as a real agent would for a target where everything is open.
async fn ingest_agent(mut sim: Sim, committed: Arc<AtomicU64>, target: u64) {
    let acked: Arc<std::sync::Mutex<HashMap<u64, u64>>> = Default::default();
    let (assign_tx, mut assign_rx) = mpsc::channel::<pb::Assign>(16);
    let notify = Arc::new(tokio::sync::Notify::new());
    {
        let (acked, notify, committed) = (acked.clone(), notify.clone(), committed.clone());
        tokio::spawn(async move {
            while let Ok(Some(m)) = sim.rx.message().await {
                match m.frame {
                    Some(In::Assign(a)) => {
                        let _ = assign_tx.send(a).await;
                    }
                    Some(In::Ack(a)) => {
                        let mut map = acked.lock().unwrap();
                        let prev = map.insert(a.shard_id, a.seq).unwrap_or(0);
                        committed.fetch_add((a.seq.saturating_sub(prev)) * BATCH as u64, Ordering::Relaxed);
                        notify.notify_waiters();
                    }
                    _ => {}
                }
            }
        });
    }
    let tx = sim.tx.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if tx.send(heartbeat()).await.is_err() {
                return;
            }
        }
    });
    let _ = &sim.id;
    while let Some(a) = assign_rx.recv().await {
        let (shard, epoch) = (a.shard_id, a.lease_epoch);
        // The scan's own space, rebuilt from the Assign like a real agent.
        let p = a.scan.clone().unwrap();
        let space = ScanSpace::new(
            AddressSet::parse_ranges(&p.address_ranges).unwrap(),
            PortSet::parse(&p.ports).unwrap(),
            p.seed,
            Permutation::MAX_LEN,
        )
        .unwrap();
        let mut pos = a.start_index;
        let mut seq = 0u64;
        while pos + BATCH as u64 <= a.end_index && committed.load(Ordering::Relaxed) < target {
            loop {
                let wait = notify.notified();
                let done = acked.lock().unwrap().get(&shard).copied().unwrap_or(0);
                if seq < done + WINDOW {
                    break;
                }
                wait.await;
            }
            seq += 1;
            let results = (pos..pos + BATCH as u64)
                .map(|p| {
                    let (ip, port) = space.probe_at(p);
                    let ip = match ip {
                        IpAddr::V4(v4) => v4.octets().to_vec(),
                        IpAddr::V6(v6) => v6.octets().to_vec(),
                    };
                    pb::PortResult {
                        ip,
                        port: u32::from(port),
                        state: pb::PortState::Open as i32,
                        ..Default::default()
                    }
                })
                .collect();
            pos += BATCH as u64;
            let frame =
                Out::Results(pb::ResultBatch { shard_id: shard, lease_epoch: epoch, seq, results, trace_parent: None });
            if sim.tx.send(pb::AgentMessage { frame: Some(frame) }).await.is_err() {
                return;
            }
        }
        if committed.load(Ordering::Relaxed) >= target {
            return;
        }
    }
}

/// Heartbeats (every 2 s, spread) and answers Assigns: reports each, then
/// completes the shard at once (freeing the slot) unless `hold` says to
/// keep it.
/// Heartbeats every 2 s (the default interval), the first at a random
/// point of the first 2 s so a fleet's do not all land at once.
fn spawn_heartbeats(sim: &Sim) {
    let tx = sim.tx.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..2000))).await;
        loop {
            if tx.send(heartbeat()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    });
}

fn run_sim(mut sim: Sim, assigned: mpsc::UnboundedSender<(String, Instant)>, hold: fn(&pb::Assign) -> bool) {
    spawn_heartbeats(&sim);
    let tx = sim.tx.clone();
    tokio::spawn(async move {
        while let Ok(Some(m)) = sim.rx.message().await {
            if let Some(In::Assign(a)) = m.frame {
                let scan_id = a.scan.as_ref().map(|s| s.scan_id.clone()).unwrap_or_default();
                let _ = assigned.send((scan_id, Instant::now()));
                if hold(&a) {
                    continue;
                }
                let done = Out::Complete(pb::ShardComplete {
                    shard_id: a.shard_id,
                    lease_epoch: a.lease_epoch,
                    seq: 1,
                    counts: None,
                });
                let _ = tx.send(pb::AgentMessage { frame: Some(done) }).await;
            }
        }
    });
}

/// The `fairshare` mode: a 4096-shard scan holds every slot of `--agents`
/// simulated agents (each shard takes `--shard-ms`); one-host scans are
/// created one after another and timed from CreateScan to their first
/// Assign; the large scan's shards per second with them vs without.
async fn fair_share(args: &[String]) {
    let agents = arg(args, "--agents", 16) as usize;
    let shard_ms = arg(args, "--shard-ms", 2000);
    let small = arg(args, "--small", 50) as usize;
    let window = Duration::from_secs(arg(args, "--window-secs", 20));
    let bin = args.iter().position(|a| a == "--controller").and_then(|i| args.get(i + 1)).cloned();
    let db = TestDb::create().await;
    let ctl = start_controller_bin(&db, bin.as_deref()).await;
    let mut api = admin_client(&db, &ctl).await;
    let large = api
        .create_scan(pb::CreateScanRequest {
            targets: vec!["198.18.0.0/15".into()],
            ports: "1-32767".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let done = Arc::new(AtomicU64::new(0));
    let (assigned_tx, mut assigned_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    for i in 0..agents {
        let sim = connect(&ctl.url, &format!("fair-{i}"), 1).await;
        run_worker(sim, assigned_tx.clone(), large.id.clone(), Duration::from_millis(shard_ms), done.clone());
    }
    // Every slot holds a shard of the large scan.
    tokio::time::sleep(Duration::from_millis(shard_ms + 3000)).await;
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(window).await;
    let alone = (done.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();
    while assigned_rx.try_recv().is_ok() {}
    let (n1, t1) = (done.load(Ordering::Relaxed), Instant::now());
    let latencies = assign_latencies(&mut api, &mut assigned_rx, small).await;
    let shared = (done.load(Ordering::Relaxed) - n1) as f64 / t1.elapsed().as_secs_f64();
    let pct = |p: f64| pct(&latencies, p);
    println!(
        "fairshare: {agents} agents x 1 slot, all held by a {}-shard scan whose shards take {shard_ms} ms",
        large.shard_count
    );
    println!(
        "  CreateScan -> first Assign of {small} one-host scans: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms \
         (goal p99 < 2000 ms: {:.2}x)",
        pct(0.5),
        pct(0.99),
        latencies.last().unwrap(),
        pct(0.99) / 2000.0
    );
    println!(
        "  large scan: {alone:.2} shards/s alone, {shared:.2} with the small scans interleaved: {:.2}x (goal >= 0.95x)",
        shared / alone
    );
}

/// Creates `n` schedules, 32 calls at a time.
async fn create_schedules(api: &portfleet_proto::auth::ApiClient, n: usize, make: impl Fn(usize) -> pb::Schedule) {
    use futures::StreamExt;
    let schedules: Vec<pb::Schedule> = (0..n).map(make).collect();
    futures::stream::iter(schedules)
        .map(|s| {
            let mut api = api.clone();
            async move { api.create_schedule(pb::CreateScheduleRequest { schedule: Some(s) }).await.unwrap() }
        })
        .buffer_unordered(32)
        .for_each(|_| async {})
        .await;
}

async fn schedules(args: &[String]) {
    let n = arg(args, "--schedules", 10_000) as usize;
    let db = TestDb::create().await;
    let ctl = start_controller(&db).await;
    let pid = ctl.child.id();
    let api = admin_client(&db, &ctl).await;
    let template = || pb::CreateScanRequest {
        targets: vec!["198.51.100.7".into()],
        ports: "80".into(),
        identify: Some(false),
        ..Default::default()
    };
    let idle = cpu_percent(pid).await;
    let t0 = Instant::now();
    // Yearly: loaded, never due during the run.
    create_schedules(&api, n, |i| pb::Schedule {
        name: format!("yearly-{i}"),
        cron: "0 0 1 1 *".into(),
        template: Some(template()),
        ..Default::default()
    })
    .await;
    let created = t0.elapsed();
    let loaded = cpu_percent(pid).await;
    println!(
        "schedules: {n} created in {:.1} s ({:.0}/s); controller CPU idle {idle:.2}% without schedules, {loaded:.2}% with {n} loaded and none due",
        created.as_secs_f64(),
        n as f64 / created.as_secs_f64()
    );
    let t1 = Instant::now();
    create_schedules(&api, n, |i| pb::Schedule {
        name: format!("minutely-{i}"),
        interval: Some(prost_types::Duration { seconds: 60, nanos: 0 }),
        template: Some(template()),
        ..Default::default()
    })
    .await;
    let spread = t1.elapsed();
    // Every first run is due within a minute of its creation.
    let mut conn = db.connect().await;
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        let fired: i64 = sqlx::query_scalar("SELECT count(*) FROM schedule_runs WHERE outcome = 'started'")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        if fired as usize >= n || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Due time (the first of each schedule) to its scan stored.
    let mut delays: Vec<f64> = sqlx::query_scalar(
        "SELECT extract(epoch FROM (s.created_at - r.due_at))::float8 * 1000
         FROM (SELECT DISTINCT ON (schedule_id) schedule_id, due_at, scan_id FROM schedule_runs
               WHERE outcome = 'started' ORDER BY schedule_id, due_at) r
         JOIN scans s ON s.id = r.scan_id",
    )
    .fetch_all(&mut conn)
    .await
    .unwrap();
    delays.sort_by(f64::total_cmp);
    let pct = |p: f64| pct(&delays, p);
    println!(
        "  {} of {n} one-minute schedules (created over {:.1} s) fired; due time -> scan stored: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms (goal p99 < 1000 ms: {:.2}x)",
        delays.len(),
        spread.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        delays.last().copied().unwrap_or(f64::NAN),
        pct(0.99) / 1000.0
    );
}

/// A simulated agent that works each shard of `large` for `work`, and any
/// other scan's at once; reports every Assign and counts the large scan's
/// completed shards.
fn run_worker(
    mut sim: Sim,
    assigned: mpsc::UnboundedSender<(String, Instant)>,
    large: String,
    work: Duration,
    done: Arc<AtomicU64>,
) {
    spawn_heartbeats(&sim);
    let tx = sim.tx.clone();
    tokio::spawn(async move {
        while let Ok(Some(m)) = sim.rx.message().await {
            let Some(In::Assign(a)) = m.frame else { continue };
            let scan_id = a.scan.as_ref().map(|s| s.scan_id.clone()).unwrap_or_default();
            let _ = assigned.send((scan_id.clone(), Instant::now()));
            let (tx, done) = (tx.clone(), done.clone());
            let is_large = scan_id == large;
            tokio::spawn(async move {
                if is_large {
                    tokio::time::sleep(work).await;
                }
                let complete = Out::Complete(pb::ShardComplete {
                    shard_id: a.shard_id,
                    lease_epoch: a.lease_epoch,
                    seq: 1,
                    counts: None,
                });
                if tx.send(pb::AgentMessage { frame: Some(complete) }).await.is_ok() && is_large {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
}

/// CreateScan -> first Assign of one-address scans, in ms, sorted.
async fn assign_latencies(
    api: &mut portfleet_proto::auth::ApiClient,
    assigned_rx: &mut mpsc::UnboundedReceiver<(String, Instant)>,
    scans: usize,
) -> Vec<f64> {
    let mut latencies = Vec::new();
    for i in 0..scans {
        let start = Instant::now();
        let scan = api
            .create_scan(pb::CreateScanRequest {
                targets: vec![format!("198.51.100.{}", i % 250 + 1)],
                ports: "80".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        loop {
            let (id, at) = tokio::time::timeout(Duration::from_secs(10), assigned_rx.recv()).await.unwrap().unwrap();
            if id == scan.id {
                latencies.push(at.duration_since(start).as_secs_f64() * 1000.0);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if std::env::var_os("BENCH_TRACE").is_some() {
        eprintln!("  latencies in order: {:?}", latencies.iter().map(|l| l.round()).collect::<Vec<_>>());
    }
    latencies.sort_by(f64::total_cmp);
    latencies
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn admin_client(db: &TestDb, ctl: &Controller) -> portfleet_proto::auth::ApiClient {
    let token = db.token(portfleet_controller::auth::Scope::Admin).await;
    portfleet_proto::auth::client(
        Channel::from_shared(ctl.url.clone()).unwrap().connect().await.unwrap(),
        portfleet_proto::auth::Bearer::new(&token).unwrap(),
    )
}

/// Controller CPU over 10 s (after 3 s to settle), % of one core.
async fn cpu_percent(pid: u32) -> f64 {
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu0, t0) = (cpu_secs(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(10)).await;
    (cpu_secs(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0
}

async fn caps(args: &[String]) {
    let agents = arg(args, "--agents", 100) as usize;
    let running = arg(args, "--running", 500) as usize;
    let scans = arg(args, "--scans", 100) as usize;
    let db = TestDb::create().await;
    let ctl = start_controller(&db).await;
    let pid = ctl.child.id();
    let (assigned_tx, mut assigned_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let slots = running.div_ceil(agents) as u32 + 1;
    for i in 0..agents {
        let sim = connect(&ctl.url, &format!("caps-{i}"), slots).await;
        // Background scans (198.18.0.0/15) keep their leases: they are running.
        run_sim(sim, assigned_tx.clone(), |a| {
            a.scan
                .as_ref()
                .is_some_and(|s| s.address_ranges.iter().any(|r| r.starts_with("198.18.") || r.starts_with("198.19.")))
        });
    }
    let mut api = admin_client(&db, &ctl).await;
    let mut specs = 0usize;
    let octet = || rand::random_range(0..=255u8);
    for _ in 0..running {
        let mut targets: Vec<String> =
            (0..20).map(|_| format!("198.{}.{}.0/24", 18 + rand::random_range(0..2u8), octet())).collect();
        targets.extend((0..20).map(|_| format!("198.{}.{}.{}", 18 + rand::random_range(0..2u8), octet(), octet())));
        specs += targets.len();
        let req = pb::CreateScanRequest { targets, ports: "80".into(), rate: 50_000, ..Default::default() };
        api.create_scan(req).await.unwrap();
    }
    for _ in 0..running {
        tokio::time::timeout(Duration::from_secs(60), assigned_rx.recv()).await.expect("background scans leased");
    }
    eprintln!("  {running} scans over {specs} target specs running on {agents} agents");
    let cpu_off = cpu_percent(pid).await;
    let off = assign_latencies(&mut api, &mut assigned_rx, scans).await;
    let caps = pb::UpdateScopePolicyRequest {
        max_rate_per_host: Some(100),
        max_rate_per_block: Some(5000),
        ..Default::default()
    };
    api.update_scope_policy(caps).await.unwrap();
    let cpu_on = cpu_percent(pid).await;
    let on = assign_latencies(&mut api, &mut assigned_rx, scans).await;
    println!("caps: {running} running scans ({specs} target specs) on {agents} simulated agents");
    println!("  controller CPU with the leases held: caps off {cpu_off:.1}%, on {cpu_on:.1}% of one core");
    for (label, l) in [("off", &off), ("on", &on)] {
        println!(
            "  CreateScan -> first Assign, caps {label}: p50 {:.1} ms, p99 {:.1} ms over {} scans",
            pct(l, 0.5),
            pct(l, 0.99),
            l.len()
        );
    }
    println!("  on/off: p50 {:.2}x, p99 {:.2}x", pct(&on, 0.5) / pct(&off, 0.5), pct(&on, 0.99) / pct(&off, 0.99));
}

async fn fleet(args: &[String]) {
    let agents = arg(args, "--agents", 1000) as usize;
    let scans = arg(args, "--scans", 100) as usize;
    let bin = args.iter().position(|a| a == "--controller").and_then(|i| args.get(i + 1)).cloned();
    let db = TestDb::create().await;
    let ctl = start_controller_bin(&db, bin.as_deref()).await;
    let pid = ctl.child.id();
    let rss_empty = rss_mb(pid);
    let (assigned_tx, mut assigned_rx) = mpsc::unbounded_channel::<(String, Instant)>();
    let connect_start = Instant::now();
    for i in 0..agents {
        let sim = connect(&ctl.url, &format!("fleet-{i}"), 1).await;
        run_sim(sim, assigned_tx.clone(), |_| false);
    }
    eprintln!("  {agents} agents connected in {:.1} s", connect_start.elapsed().as_secs_f64());
    // Idle: heartbeats only.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (cpu0, t0) = (cpu_secs(pid), Instant::now());
    let mut rss_idle = 0f64;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rss_idle = rss_idle.max(rss_mb(pid));
    }
    let idle_cpu = (cpu_secs(pid) - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let mut api = admin_client(&db, &ctl).await;
    let latencies = assign_latencies(&mut api, &mut assigned_rx, scans).await;
    let pct = |p: f64| pct(&latencies, p);
    println!("fleet: {agents} simulated agents on one controller, heartbeats every 2 s");
    println!("  controller RSS: {rss_empty:.1} MB with no agents, {rss_idle:.1} MB with {agents} idle agents");
    println!("  controller CPU while idle: {idle_cpu:.1}% of one core");
    println!(
        "  CreateScan -> first Assign over {} scans: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        latencies.last().unwrap()
    );
    println!("  vs goals: RSS {:.2}x of 300 MB, p99 {:.2}x of 100 ms", rss_idle / 300.0, pct(0.99) / 100.0);
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        // A child process of `watch` with a runtime of its own (one
        // thread), so it starts before and instead of the multi-threaded one.
        Some("watch-client") => watch::client(&args),
        _ => bench(&args),
    }
}

#[tokio::main]
async fn bench(args: &[String]) {
    match args.get(1).map(String::as_str) {
        Some("ingest") => ingest(args).await,
        Some("fleet") => fleet(args).await,
        Some("caps") => caps(args).await,
        Some("watch") => watch::bench(args).await,
        Some("inventory") => inventory::bench(args).await,
        Some("observability") => observability(args).await,
        Some("fairshare") => fair_share(args).await,
        Some("schedules") => schedules(args).await,
        _ => {
            eprintln!("usage: session-bench ingest|fleet|caps|watch|inventory [options] (see the file's header)");
            std::process::exit(2);
        }
    }
}

/// The `watch` mode: WatchScan streams against a scan's pace and GetScan's
/// latency.
mod watch {
    use std::{
        collections::HashMap,
        net::IpAddr,
        sync::{
            Arc, Mutex,
            atomic::{AtomicBool, AtomicU64, Ordering},
        },
        time::{Duration, Instant, SystemTime},
    };

    use portfleet_core::{AddressSet, PortSet, ScanSpace, permutation::Permutation};
    use portfleet_proto::{
        auth::Bearer,
        v1::{
            self as pb, agent_message::Frame as Out, agent_service_client::AgentServiceClient,
            controller_message::Frame as In, watch_scan_response::Event,
        },
    };
    use portfleet_tests::TestDb;
    use tokio::sync::{mpsc, watch};
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::transport::Channel;

    use super::{admin_client, arg, cpu_secs, pct, start_controller_bin};

    /// Under the default cap per token (32).
    const WATCHERS_PER_TOKEN: usize = 25;
    /// Under the controller's 128 streams per connection.
    const STREAMS_PER_CONNECTION: usize = 100;
    /// One position in this many reports open: 4096 results in the scan.
    const OPEN_EVERY: u64 = 256;
    /// Frames of a lease in flight, as the controller's Welcome allows.
    const WINDOW: u64 = 64;
    const SLOTS_PER_AGENT: u32 = 2;

    struct Figures {
        scan_secs: f64,
        p50_ms: f64,
        p99_ms: f64,
        samples: usize,
        holds: u64,
        max_silence_ms: u64,
        controller_cpu: f64,
        bench_cpu: f64,
        watchers_complete: usize,
    }

    pub async fn bench(args: &[String]) {
        let watchers = arg(args, "--watchers", 500) as usize;
        let runs = arg(args, "--runs", 3) as usize;
        let agents = arg(args, "--agents", 4) as usize;
        let shard_rate = arg(args, "--shard-rate", 8000);
        let bin = args.iter().position(|a| a == "--controller").and_then(|i| args.get(i + 1)).cloned();
        let nice = args.iter().any(|a| a == "--client-nice");
        println!(
            "watch: 198.18.0.0/16 x 16 ports (2^20 positions, 64 shards) on {agents} simulated agents x \
             {SLOTS_PER_AGENT} slots, {shard_rate} positions/s per shard, 1 in {OPEN_EVERY} open; \
             GetScan every 10 ms; controller {}",
            bin.as_deref().unwrap_or("(built with this bench)")
        );
        let (mut none, mut many) = (Vec::new(), Vec::new());
        for run in 1..=runs {
            for n in [0, watchers] {
                let f = run_once(n, agents, shard_rate, bin.as_deref(), nice).await;
                println!(
                    "  run {run}, {n:>4} watchers: scan {:.1} s, GetScan p50 {:.2} ms p99 {:.2} ms ({} calls), \
                     agent holds {} (longest silence {} ms), controller CPU {:.0}%, bench CPU {:.0}%, \
                     watchers with every result {}/{n}",
                    f.scan_secs,
                    f.p50_ms,
                    f.p99_ms,
                    f.samples,
                    f.holds,
                    f.max_silence_ms,
                    f.controller_cpu,
                    f.bench_cpu,
                    f.watchers_complete
                );
                if n == 0 { none.push(f) } else { many.push(f) }
            }
        }
        let median = |v: &[Figures], f: fn(&Figures) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(f64::total_cmp);
            x[x.len() / 2]
        };
        println!("medians of {runs} runs:");
        println!("  | watchers | scan | GetScan p50 | GetScan p99 | agent holds | controller CPU |");
        for (n, v) in [(0, &none), (watchers, &many)] {
            println!(
                "  | {n} | {:.1} s | {:.2} ms | {:.2} ms | {} | {:.0}% |",
                median(v, |f| f.scan_secs),
                median(v, |f| f.p50_ms),
                median(v, |f| f.p99_ms),
                median(v, |f| f.holds as f64),
                median(v, |f| f.controller_cpu)
            );
        }
        let ratio = |f: fn(&Figures) -> f64| median(&many, f) / median(&none, f);
        println!(
            "  {watchers}/0 watchers: scan duration {:.2}x, GetScan p50 {:.2}x, p99 {:.2}x (goal: within 1.2x)",
            ratio(|f| f.scan_secs),
            ratio(|f| f.p50_ms),
            ratio(|f| f.p99_ms)
        );
    }

    async fn run_once(watchers: usize, agents: usize, shard_rate: u64, bin: Option<&str>, nice: bool) -> Figures {
        let db = TestDb::create().await;
        let ctl = start_controller_bin(&db, bin).await;
        let pid = ctl.child.id();
        let mut api = admin_client(&db, &ctl).await;
        let scan = api
            .create_scan(pb::CreateScanRequest {
                targets: vec!["198.18.0.0/16".into()],
                ports: "1-16".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();

        // The watchers, each past its first event, before any agent: a
        // cheap client, one thread for all their streams.
        let mut tokens = Vec::new();
        for _ in 0..watchers.div_ceil(WATCHERS_PER_TOKEN) {
            tokens.push(db.token(portfleet_controller::auth::Scope::Read).await);
        }
        // One process for all the watchers' streams, so its CPU shows
        // apart from this one's (and, with `--client-nice`, yields to the
        // controller, Postgres and the GetScan prober, as a client on
        // another machine would).
        let mut client = tokio::process::Command::new(if nice { "nice" } else { "env" });
        if nice {
            client.args(["-n", "19"]);
        }
        let mut client = client
            .arg(std::env::current_exe().unwrap())
            .args(["watch-client", &ctl.url, &scan.id, &watchers.to_string()])
            .args(&tokens)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let client_pid = client.id().unwrap_or(0);
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(client.stdout.take().unwrap()));
        assert_eq!(lines.next_line().await.unwrap().as_deref(), Some("ready"), "the watchers' client started");
        tokio::time::sleep(Duration::from_secs(1)).await;

        let (cpu_ctl, cpu_bench) = (cpu_secs(pid), cpu_secs(std::process::id()) + cpu_secs(client_pid));
        let start = Instant::now();
        let stats = Arc::new(SimStats::default());
        let sims: Vec<_> = (0..agents)
            .map(|i| tokio::spawn(agent(ctl.url.clone(), format!("watch-{i}"), shard_rate, stats.clone())))
            .collect();
        // GetScan is timed from a thread and runtime of its own, so the
        // watchers' decoding in this process never queues ahead of it.
        let (probe_token, url, id) =
            (db.token(portfleet_controller::auth::Scope::Read).await, ctl.url.clone(), scan.id.clone());
        let prober = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let mut probe = portfleet_proto::auth::client(
                    Channel::from_shared(url).unwrap().connect().await.unwrap(),
                    Bearer::new(&probe_token).unwrap(),
                );
                let mut latencies = Vec::new();
                loop {
                    let t = Instant::now();
                    let s = probe.get_scan(pb::GetScanRequest { id: id.clone() }).await.unwrap().into_inner();
                    latencies.push(t.elapsed().as_secs_f64() * 1000.0);
                    if s.state == pb::ScanState::Completed as i32 {
                        return (latencies, s, Instant::now());
                    }
                    assert!(start.elapsed() < Duration::from_secs(1200), "the scan did not finish in 20 minutes");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            })
        });
        let (mut latencies, final_scan, done_at) =
            tokio::task::spawn_blocking(move || prober.join().unwrap()).await.unwrap();
        let elapsed = done_at.duration_since(start).as_secs_f64();
        let controller_cpu = (cpu_secs(pid) - cpu_ctl) / elapsed * 100.0;
        let bench_cpu = (cpu_secs(std::process::id()) + cpu_secs(client_pid) - cpu_bench) / elapsed * 100.0;
        let (holds, max_silence_ms) =
            (stats.holds.load(Ordering::Relaxed), stats.max_silence_ms.load(Ordering::Relaxed));
        for s in sims {
            s.abort();
        }
        // The client prints each watch's result count as it ends.
        let mut watchers_complete = 0;
        let expected = final_scan.open_ports.to_string();
        let mut ended = 0;
        while ended < watchers {
            match tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await {
                Ok(Ok(Some(line))) => {
                    ended += 1;
                    if line == expected {
                        watchers_complete += 1;
                    } else {
                        eprintln!("  a watcher saw {line} of {expected} results");
                    }
                }
                Ok(_) => break,
                Err(_) => {
                    eprintln!("  watchers still open a minute after the scan ended");
                    break;
                }
            }
        }
        let _ = client.kill().await;
        latencies.sort_by(f64::total_cmp);
        Figures {
            scan_secs: elapsed,
            p50_ms: pct(&latencies, 0.5),
            p99_ms: pct(&latencies, 0.99),
            samples: latencies.len(),
            holds,
            max_silence_ms,
            controller_cpu,
            bench_cpu,
            watchers_complete,
        }
    }

    /// `watch-client URL SCAN N TOKEN...`: the watchers' process, one
    /// thread. Opens N watches of SCAN over a few connections, each past its
    /// first event, prints `ready`, then follows them all to their ends and
    /// prints each one's result count (`failed` when it failed).
    pub fn client(args: &[String]) {
        let (url, id) = (args[2].clone(), args[3].clone());
        let n: usize = args[4].parse().unwrap();
        let tokens = args[5..].to_vec();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(follow_watches(url, id, n, tokens));
    }

    async fn follow_watches(url: String, id: String, n: usize, tokens: Vec<String>) {
        let mut channels = Vec::new();
        for _ in 0..n.div_ceil(STREAMS_PER_CONNECTION) {
            channels.push(Channel::from_shared(url.clone()).unwrap().connect().await.unwrap());
        }
        let mut tasks = Vec::new();
        for i in 0..n {
            let bearer = Bearer::new(&tokens[i / WATCHERS_PER_TOKEN]).unwrap();
            let mut client = portfleet_proto::auth::client(channels[i % channels.len()].clone(), bearer);
            let mut stream = client.watch_scan(pb::WatchScanRequest { id: id.clone() }).await.unwrap().into_inner();
            stream.message().await.unwrap();
            tasks.push(tokio::spawn(async move {
                let mut results = 0;
                loop {
                    match stream.message().await {
                        Ok(Some(m)) => {
                            if let Some(Event::Results(r)) = m.event {
                                results += r.results.len();
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            eprintln!("  a watch failed: {e}");
                            println!("failed");
                            return;
                        }
                    }
                }
                println!("{results}");
            }));
        }
        println!("ready");
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Aborts a simulated agent's helper tasks when it ends or is aborted.
    struct Tasks(Vec<tokio::task::JoinHandle<()>>);

    impl Drop for Tasks {
        fn drop(&mut self) {
            for t in &self.0 {
                t.abort();
            }
        }
    }

    #[derive(Default)]
    struct SimStats {
        /// Times an agent would have held its probes (the real agent's rule).
        holds: AtomicU64,
        /// The longest time since the last echoed heartbeat.
        max_silence_ms: AtomicU64,
    }

    fn timestamp(t: SystemTime) -> prost_types::Timestamp {
        let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
        prost_types::Timestamp { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
    }

    fn system_time(t: &prost_types::Timestamp) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32)
    }

    /// A simulated agent: heartbeats, echo-watching with the real agent's
    /// hold rule, and a paced task per leased shard.
    async fn agent(url: String, name: String, shard_rate: u64, stats: Arc<SimStats>) {
        let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
        let (tx, rx) = mpsc::channel(256);
        let hello_sent = SystemTime::now();
        let hello = pb::Hello {
            agent_id: uuid::Uuid::new_v4().to_string(),
            name,
            version: "bench".into(),
            min_protocol_version: 1,
            max_protocol_version: 1,
            capabilities: Some(pb::Capabilities { raw_socket: true, ipv6: true }),
            max_shards: SLOTS_PER_AGENT,
            ..Default::default()
        };
        tx.send(pb::AgentMessage { frame: Some(Out::Hello(hello)) }).await.unwrap();
        let mut inbound = AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await.unwrap().into_inner();
        let welcome = match inbound.message().await.unwrap().and_then(|m| m.frame) {
            Some(In::Welcome(w)) => w,
            other => panic!("no Welcome: {other:?}"),
        };
        // agent/src/session: hold a margin before the lease could lapse.
        let limits = welcome.limits.unwrap_or_default();
        let lapse = [limits.lease_ttl_ms, limits.disconnect_grace_ms].into_iter().filter(|&ms| ms > 0).min();
        let hold_after = lapse.map(|ms| {
            let lapse = Duration::from_millis(u64::from(ms));
            lapse.saturating_sub((lapse / 10).max(Duration::from_millis(250)))
        });
        let fresh = Arc::new(Mutex::new(hello_sent));
        let held = Arc::new(AtomicBool::new(false));
        let mut tasks = Tasks(Vec::new());
        let beat = tx.clone();
        let interval = Duration::from_millis(u64::from(welcome.heartbeat_interval_ms).max(100));
        tasks.0.push(tokio::spawn(async move {
            loop {
                let h = pb::Heartbeat { sent_at: Some(timestamp(SystemTime::now())), ..Default::default() };
                if beat.send(pb::AgentMessage { frame: Some(Out::Heartbeat(h)) }).await.is_err() {
                    return;
                }
                tokio::time::sleep(interval).await;
            }
        }));
        {
            let (fresh, held, stats) = (fresh.clone(), held.clone(), stats.clone());
            tasks.0.push(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let since = *fresh.lock().unwrap();
                    let silent = SystemTime::now().duration_since(since).unwrap_or_default();
                    stats.max_silence_ms.fetch_max(silent.as_millis() as u64, Ordering::Relaxed);
                    let hold = hold_after.is_some_and(|d| silent > d);
                    if hold && !held.swap(true, Ordering::Relaxed) {
                        stats.holds.fetch_add(1, Ordering::Relaxed);
                    } else if !hold {
                        held.store(false, Ordering::Relaxed);
                    }
                }
            }));
        }
        let mut acks: HashMap<u64, watch::Sender<u64>> = HashMap::new();
        while let Ok(Some(m)) = inbound.message().await {
            match m.frame {
                Some(In::Assign(a)) => {
                    let (ack_tx, ack_rx) = watch::channel(0);
                    acks.insert(a.shard_id, ack_tx);
                    tasks.0.push(tokio::spawn(shard(a, tx.clone(), ack_rx, held.clone(), shard_rate)));
                }
                Some(In::Ack(a)) => {
                    if let Some(w) = acks.get(&a.shard_id) {
                        w.send_modify(|seq| *seq = (*seq).max(a.seq));
                    }
                }
                Some(In::Heartbeat(h)) => {
                    if let Some(sent) = h.sent_at.as_ref().map(system_time) {
                        let mut f = fresh.lock().unwrap();
                        *f = (*f).max(sent);
                    }
                }
                _ => {}
            }
        }
        drop(tasks);
    }

    /// Reports a leased shard at `rate` positions/s: a batch of the open
    /// ones every 100 ms, a checkpoint every second, at most WINDOW frames
    /// unacked, nothing while held; then completes it.
    async fn shard(
        a: pb::Assign,
        tx: mpsc::Sender<pb::AgentMessage>,
        mut acked: watch::Receiver<u64>,
        held: Arc<AtomicBool>,
        rate: u64,
    ) {
        let p = a.scan.clone().unwrap();
        let space = ScanSpace::new(
            AddressSet::parse_ranges(&p.address_ranges).unwrap(),
            PortSet::parse(&p.ports).unwrap(),
            p.seed,
            Permutation::MAX_LEN,
        )
        .unwrap();
        let (shard, epoch) = (a.shard_id, a.lease_epoch);
        let step = (rate / 10).max(1);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut pos, mut seq, mut ticks) = (a.start_index, 0u64, 0u32);
        let send = |frame: Out| {
            let tx = tx.clone();
            async move { tx.send(pb::AgentMessage { frame: Some(frame) }).await.is_ok() }
        };
        while pos < a.end_index {
            tick.tick().await;
            if held.load(Ordering::Relaxed) {
                continue;
            }
            let end = (pos + step).min(a.end_index);
            let results: Vec<pb::PortResult> = (pos.next_multiple_of(OPEN_EVERY)..end)
                .step_by(OPEN_EVERY as usize)
                .map(|p| {
                    let (ip, port) = space.probe_at(p);
                    let ip = match ip {
                        IpAddr::V4(v4) => v4.octets().to_vec(),
                        IpAddr::V6(v6) => v6.octets().to_vec(),
                    };
                    pb::PortResult {
                        ip,
                        port: u32::from(port),
                        state: pb::PortState::Open as i32,
                        ..Default::default()
                    }
                })
                .collect();
            pos = end;
            ticks += 1;
            if !results.is_empty() {
                seq += 1;
                if acked.wait_for(|&done| seq <= done + WINDOW).await.is_err()
                    || !send(Out::Results(pb::ResultBatch {
                        shard_id: shard,
                        lease_epoch: epoch,
                        seq,
                        results,
                        trace_parent: None,
                    }))
                    .await
                {
                    return;
                }
            }
            if ticks % 10 == 0 && pos < a.end_index {
                seq += 1;
                let progress = pb::Progress { shard_id: shard, lease_epoch: epoch, seq, checkpoint: pos, counts: None };
                if acked.wait_for(|&done| seq <= done + WINDOW).await.is_err() || !send(Out::Progress(progress)).await {
                    return;
                }
            }
        }
        seq += 1;
        if acked.wait_for(|&done| seq <= done + WINDOW).await.is_ok() {
            let done = pb::ShardComplete { shard_id: shard, lease_epoch: epoch, seq, counts: None };
            send(Out::Complete(done)).await;
        }
    }
}

mod inventory {
    use super::*;

    const SPACE: &str = "198.18.0.0/15";

    fn median(mut v: Vec<f64>) -> f64 {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    /// The ingest scan: far more positions than any run reports.
    async fn big_scan(api: &mut portfleet_proto::auth::ApiClient) -> String {
        scan_of(api, SPACE, "1-32767").await
    }

    async fn scan_of(api: &mut portfleet_proto::auth::ApiClient, targets: &str, ports: &str) -> String {
        api.create_scan(pb::CreateScanRequest {
            targets: vec![targets.into()],
            ports: ports.into(),
            identify: Some(false),
            // Enough shards for every simulated agent.
            rate: 1_000_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id
    }

    async fn lagging(db: &TestDb) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM shards sh LEFT JOIN inventory_cursors c ON c.shard_id = sh.id
             WHERE sh.result_batches > coalesce(c.batches, 0)",
        )
        .fetch_one(&mut db.connect().await)
        .await
        .unwrap()
    }

    /// Results/s of one ingest of `n` results; with the inventory, also
    /// the results in Postgres (the agents' in-flight frames land after the
    /// count is reached) and the seconds from the start until the inventory
    /// has folded all of them.
    async fn ingest_once(n: u64, agents: usize, with_inventory: bool) -> (f64, Option<(i64, f64)>) {
        let db = TestDb::create().await;
        let extra: &[&str] = if with_inventory { &[] } else { &["--no-inventory"] };
        let ctl = start_controller_with(&db, None, extra).await;
        let mut api = admin_client(&db, &ctl).await;
        big_scan(&mut api).await;
        let committed = Arc::new(AtomicU64::new(0));
        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..agents {
            let sim = connect(&ctl.url, &format!("ingest-{i}"), 1).await;
            tasks.push(tokio::spawn(ingest_agent(sim, committed.clone(), n)));
        }
        while committed.load(Ordering::Relaxed) < n {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        for t in tasks {
            t.abort();
        }
        let rate = committed.load(Ordering::Relaxed) as f64 / elapsed;
        let caught_up = if with_inventory {
            while lagging(&db).await > 0 {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            let secs = start.elapsed().as_secs_f64();
            Some((results_of(&db, None).await, secs))
        } else {
            None
        };
        (rate, caught_up)
    }

    async fn results_of(db: &TestDb, scan: Option<&str>) -> i64 {
        let scan: Option<uuid::Uuid> = scan.map(|s| s.parse().unwrap());
        sqlx::query_scalar("SELECT count(*) FROM results WHERE $1::uuid IS NULL OR scan_id = $1")
            .bind(scan)
            .fetch_one(&mut db.connect().await)
            .await
            .unwrap()
    }

    fn pcts(mut ms: Vec<f64>) -> (f64, f64) {
        ms.sort_by(f64::total_cmp);
        (pct(&ms, 0.5), pct(&ms, 0.99))
    }

    async fn timed<F, Fut>(n: usize, mut f: F) -> (f64, f64)
    where
        F: FnMut(usize) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut ms = Vec::with_capacity(n);
        for i in 0..n {
            let t = Instant::now();
            f(i).await;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        pcts(ms)
    }

    pub async fn bench(args: &[String]) {
        let n = arg(args, "--results", 2_000_000);
        let runs = arg(args, "--runs", 3) as usize;
        let rows = arg(args, "--inventory-rows", 10_000_000) as i64;
        let agents = 16;

        // Ingest, with and without the inventory, alternating.
        let (mut with, mut without, mut fold) = (Vec::new(), Vec::new(), Vec::new());
        for run in 1..=runs {
            let (off, _) = ingest_once(n, agents, false).await;
            let (on, caught_up) = ingest_once(n, agents, true).await;
            let (rows, secs) = caught_up.unwrap_or((0, 1.0));
            eprintln!(
                "  run {run}: {off:.0} results/s without the inventory, {on:.0} with; {rows} results folded {secs:.1} s after the start"
            );
            without.push(off);
            with.push(on);
            fold.push(rows as f64 / secs);
        }
        let (on, off, folded) = (median(with), median(without), median(fold));
        println!("inventory: ingest of {n} results, {agents} agents, median of {runs}");
        println!(
            "  with the inventory {on:.0} results/s, without {off:.0}: {:.2}x (goal >= 0.80x); \
             the inventory folds {folded:.0} results/s (all-open results, each a new port)",
            on / off
        );

        // DiffScans of two scans of 1M results, 1% changed each way.
        let db = TestDb::create().await;
        let ctl = start_controller(&db).await;
        let mut api = admin_client(&db, &ctl).await;
        let a = scan_of(&mut api, "198.18.0.0/16", "1-32767").await;
        let b = scan_of(&mut api, "198.18.0.0/16", "1-32767").await;
        let mut conn = db.connect().await;
        let t = Instant::now();
        for (id, from) in [(&a, 0i64), (&b, 10_000)] {
            let id: uuid::Uuid = id.parse().unwrap();
            sqlx::query("UPDATE shards SET state = 'done', checkpoint = end_index WHERE scan_id = $1")
                .bind(id)
                .execute(&mut conn)
                .await
                .unwrap();
            sqlx::query(
                "INSERT INTO results (scan_id, position, ip, port, first_seen_at, last_seen_at)
                 SELECT $1, i, '198.18.0.0'::inet + (i % 65536), 1 + i / 65536, now(), now()
                 FROM generate_series($2::int8, $2 + 999999) AS i",
            )
            .bind(id)
            .bind(from)
            .execute(&mut conn)
            .await
            .unwrap();
        }
        sqlx::query("ANALYZE results").execute(&mut conn).await.unwrap();
        eprintln!("  two scans of 1M results stored in {:.1} s", t.elapsed().as_secs_f64());
        let mut secs = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let d = api
                .diff_scans(pb::DiffScansRequest { a: a.clone(), b: b.clone(), page_size: 1000, ..Default::default() })
                .await
                .unwrap()
                .into_inner();
            secs.push(t.elapsed().as_secs_f64());
            assert_eq!((d.opened, d.closed, d.unchanged), (10_000, 10_000, 990_000), "{d:?}");
        }
        println!(
            "  DiffScans of 1M vs 1M results (10,000 opened, 10,000 closed): median {:.2} s of 5 (goal < 2 s)",
            median(secs)
        );

        // Deleting scan a (1M results) while agents ingest into another.
        sqlx::query("UPDATE scans SET state = 'completed', started_at = now(), finished_at = now() WHERE id = ANY($1)")
            .bind(vec![a.parse::<uuid::Uuid>().unwrap(), b.parse::<uuid::Uuid>().unwrap()])
            .execute(&mut conn)
            .await
            .unwrap();
        // Apart from a's space, so that its closures have nothing to do.
        let c = scan_of(&mut api, "198.19.0.0/16", "1-65535").await;
        let committed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..agents {
            let sim = connect(&ctl.url, &format!("delete-{i}"), 1).await;
            tasks.push(tokio::spawn(ingest_agent(sim, committed.clone(), u64::MAX)));
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (c0, t0) = (results_of(&db, Some(&c)).await, Instant::now());
        tokio::time::sleep(Duration::from_secs(10)).await;
        let before = (results_of(&db, Some(&c)).await - c0) as f64 / t0.elapsed().as_secs_f64();
        // Inventoried first (its closures read its results).
        let a_id: uuid::Uuid = a.parse().unwrap();
        loop {
            let done: bool = sqlx::query_scalar("SELECT inventoried FROM scans WHERE id = $1")
                .bind(a_id)
                .fetch_one(&mut conn)
                .await
                .unwrap();
            if done {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (c1, t1) = (results_of(&db, Some(&c)).await, Instant::now());
        api.delete_scan(pb::DeleteScanRequest { id: a.clone() }).await.unwrap();
        loop {
            // Its results; the scan row waits for its events, which no
            // publisher takes here (no RabbitMQ), to expire.
            let left: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM results WHERE scan_id = $1)")
                .bind(a_id)
                .fetch_one(&mut conn)
                .await
                .unwrap();
            if !left {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let delete_secs = t1.elapsed().as_secs_f64();
        let during = (results_of(&db, Some(&c)).await - c1) as f64 / delete_secs;
        for t in tasks {
            t.abort();
        }
        println!(
            "  DeleteScan of 1M results: gone in {delete_secs:.1} s; concurrent ingest {during:.0} results/s during it \
             vs {before:.0} before: {:.2}x",
            during / before
        );
        drop(ctl);

        // Queries over an inventory of `rows` ports and as many changes.
        let db = TestDb::create().await;
        let ctl = start_controller(&db).await;
        let mut api = admin_client(&db, &ctl).await;
        let mut conn = db.connect().await;
        let t = Instant::now();
        let hosts = rows / 10;
        sqlx::query(
            "INSERT INTO inventory_ports (ip, port, state, first_open_at, last_open_at, open_scan_id, last_probed_at,
                                          last_scan_id, changed_at)
             SELECT '10.0.0.0'::inet + i / 10, 1000 + i % 10, 'open', now(), now(), gen_random_uuid(), now(),
                    gen_random_uuid(), now()
             FROM generate_series(0::int8, $1 - 1) AS i",
        )
        .bind(rows)
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO inventory_changes (kind, ip, port, at, scan_id)
             SELECT 'opened', '10.0.0.0'::inet + i / 10, 1000 + i % 10, now(), gen_random_uuid()
             FROM generate_series(0::int8, $1 - 1) AS i",
        )
        .bind(rows)
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO inventory_hosts (ip, open_ports, first_seen_at, last_seen_at)
             SELECT '10.0.0.0'::inet + i, 10, now(), now() FROM generate_series(0::int8, $1 - 1) AS i",
        )
        .bind(hosts)
        .execute(&mut conn)
        .await
        .unwrap();
        sqlx::query("ANALYZE").execute(&mut conn).await.unwrap();
        eprintln!("  {rows} ports, {rows} changes, {hosts} hosts stored in {:.0} s", t.elapsed().as_secs_f64());
        let ip = |_: usize| {
            let k = rand::random_range(0..hosts as u32);
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) + k).to_string()
        };
        let q = 300;
        let get_host = timed(q, |i| {
            let mut api = api.clone();
            let ip = ip(i);
            async move {
                let h = api.get_host(pb::GetHostRequest { ip }).await.unwrap().into_inner();
                assert_eq!(h.ports.len(), 10);
            }
        })
        .await;
        let newest = timed(q, |_| {
            let mut api = api.clone();
            async move {
                let c = api.list_changes(pb::ListChangesRequest::default()).await.unwrap().into_inner();
                assert_eq!(c.changes.len(), 100);
            }
        })
        .await;
        let by_cidr = timed(q, |i| {
            let mut api = api.clone();
            let cidr = format!("{}/24", ip(i));
            async move {
                api.list_changes(pb::ListChangesRequest { cidr, ..Default::default() }).await.unwrap();
            }
        })
        .await;
        let by_port = timed(q, |i| {
            let mut api = api.clone();
            async move {
                let port = Some(1000 + (i % 10) as u32);
                let c = api.list_changes(pb::ListChangesRequest { port, ..Default::default() }).await.unwrap();
                assert_eq!(c.into_inner().changes.len(), 100);
            }
        })
        .await;
        let list_hosts = timed(q, |i| {
            let mut api = api.clone();
            let cidr = format!("{}/20", ip(i));
            async move {
                api.list_hosts(pb::ListHostsRequest { cidr, ..Default::default() }).await.unwrap();
            }
        })
        .await;
        println!("  queries over {rows} ports and {rows} changes, {q} calls each, ms p50 / p99 (goal p99 < 50 ms):");
        for (name, (p50, p99)) in [
            ("GetHost (10 ports, its changes)", get_host),
            ("ListChanges, newest 100", newest),
            ("ListChanges by /24", by_cidr),
            ("ListChanges by port", by_port),
            ("ListHosts by /20", list_hosts),
        ] {
            println!("    {name:<34} {p50:6.1} / {p99:6.1}  ({:.2}x of the goal)", p99 / 50.0);
        }
        let _ = api.get_host(pb::GetHostRequest { ip: "10.0.0.1".into() }).await;
    }
}
