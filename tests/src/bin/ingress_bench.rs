//! The RabbitMQ ingress under load, against the real controller binary,
//! broker and Postgres:
//!
//!   cargo build --release -p portfleet-controller -p portfleet-tests --bins
//!   ./target/release/ingress-bench [--burst 20000] [--paced 2000] [--seconds 10] [--prefetch 128]
//!
//! Phase 1 (throughput): `--burst` requests published at once; requests
//! consumed per second, from the first publish to the last scan committed
//! (each acked only after its scan row commits).
//! Phase 2 (latency): requests published at a steady `--paced` per second
//! for `--seconds`; p50/p95/p99 from publish to scan row committed (the
//! publisher's clock in the message vs the arrival of the NOTIFY that the
//! creating transaction sends, which Postgres delivers only after commit).
//! Prints the ratios to NaabuM8's target (1,000/s, p95 < 100 ms) and to
//! this project's goal (5,000/s, p95 < 20 ms).
//!
//!   ./target/release/ingress-bench --memory
//!
//! Instead: the controller's peak RSS while 8 maximum-size requests (the
//! default limit, 1 MiB of targets each) are in flight, then while 8
//! 32 MiB bodies arrive (refused unparsed); goal < 300 MB.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lapin::{BasicProperties, options::BasicPublishOptions};
use portfleet_tests::{TestDb, amqp::TestBroker};

fn arg(args: &[String], name: &str, default: u64) -> u64 {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as i64
}

fn body(i: u64, phase: &str) -> Vec<u8> {
    format!(
        r#"{{"targets":["198.51.100.{}"],"ports":"80,443","rate":100,"labels":{{"sent_us":"{}","phase":"{phase}"}}}}"#,
        i % 250 + 1,
        now_micros()
    )
    .into_bytes()
}

async fn count(pool: &sqlx::PgPool, phase: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM scans WHERE labels->>'phase' = $1")
        .bind(phase)
        .fetch_one(pool)
        .await
        .unwrap_or(0)
}

/// Arrival time (this process's clock) of each scan-creation NOTIFY.
struct CommitListener(tokio::task::JoinHandle<HashMap<String, i64>>, tokio::sync::oneshot::Sender<()>);

impl CommitListener {
    async fn start(url: &str) -> Self {
        let mut listener = sqlx::postgres::PgListener::connect(url).await.unwrap();
        listener.listen("portfleet").await.unwrap();
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let mut seen = HashMap::new();
            loop {
                tokio::select! {
                    _ = &mut stopped => break seen,
                    n = listener.recv() => {
                        let n = n.unwrap();
                        if let Some(first) = n.payload().strip_prefix("c:") {
                            seen.insert(first.to_string(), now_micros());
                        }
                    }
                }
            }
        });
        CommitListener(task, stop)
    }

    async fn abort_and_collect(self) -> HashMap<String, i64> {
        let _ = self.1.send(());
        self.0.await.unwrap()
    }
}

/// Publishes request `i` of `phase`, persistent, without waiting for its
/// confirm (a phase awaits all of them at once).
async fn publish(broker: &TestBroker, i: u64, phase: &str) {
    let c = &broker.config;
    let props = BasicProperties::default().with_message_id(format!("{phase}-{i}").into()).with_delivery_mode(2);
    let confirm = broker
        .channel
        .basic_publish(
            c.exchange.as_str().into(),
            c.routing_key.as_str().into(),
            BasicPublishOptions::default(),
            &body(i, phase),
            props,
        )
        .await
        .unwrap();
    drop(confirm);
}

/// The controller, killed however the bench ends.
struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The process's resident set, in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

/// Peak RSS while `work` runs, sampled every 5 ms.
async fn peak_rss<F: std::future::Future<Output = ()>>(pid: u32, work: F) -> f64 {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak: f64 = 0.0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss_mib(pid));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    work.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap()
}

async fn memory_phase(broker: &TestBroker, pool: &sqlx::PgPool, pid: u32) {
    let limit = portfleet_controller::ingress::DEFAULT_MAX_MESSAGE_BYTES;
    let c = &broker.config;
    // Just under the limit: every target a distinct string, so parsing
    // holds them all.
    let body_of = |tag: u32, bytes: usize| {
        let mut targets = Vec::new();
        let mut len = 40;
        let mut i = 0u32;
        while len + 20 < bytes {
            let t = format!("198.51.100.{}", i % 256);
            len += t.len() + 3;
            targets.push(t);
            i += 1;
        }
        serde_json::to_vec(
            &serde_json::json!({ "targets": targets, "ports": "80", "labels": { "phase": format!("mem-{tag}") } }),
        )
        .unwrap()
    };
    let idle = rss_mib(pid);
    let max_size: Vec<Vec<u8>> = (0..8).map(|i| body_of(i, limit - 64)).collect();
    assert!(max_size.iter().all(|b| b.len() <= limit), "bodies within the limit");
    let peak_valid = peak_rss(pid, async {
        for b in &max_size {
            broker.publish(&c.exchange, &c.routing_key, b, BasicProperties::default()).await;
        }
        while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM scans WHERE labels->>'phase' LIKE 'mem-%'")
            .fetch_one(pool)
            .await
            .unwrap_or(0)
            < 8
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let huge = vec![b' '; 32 << 20];
    let dlq = format!("{}.dlq", c.queue);
    let peak_huge = peak_rss(pid, async {
        for _ in 0..8 {
            broker.publish(&c.exchange, &c.routing_key, &huge, BasicProperties::default()).await;
        }
        while broker.depth(&dlq).await < 8 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    println!("ingress memory: controller RSS idle {idle:.0} MiB");
    println!(
        "  8 requests of {} KiB (the maximum) in flight: peak {peak_valid:.0} MiB ({:.2}x the 300 MB goal)",
        max_size[0].len() / 1024,
        peak_valid * 1.048_576 / 300.0
    );
    println!(
        "  8 bodies of 32 MiB (refused unparsed): peak {peak_huge:.0} MiB ({:.2}x the goal)",
        peak_huge * 1.048_576 / 300.0
    );
}

#[tokio::main]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let args: Vec<String> = std::env::args().collect();
    let burst = arg(&args, "--burst", 20_000);
    let paced = arg(&args, "--paced", 2_000);
    let seconds = arg(&args, "--seconds", 10);
    let memory = args.iter().any(|a| a == "--memory");
    let prefetch = arg(&args, "--prefetch", u64::from(portfleet_controller::ingress::DEFAULT_PREFETCH));
    let db = TestDb::create().await;
    let mut broker = TestBroker::new().await;
    broker.config.naabum8 = None;
    let exe = std::env::current_exe().unwrap();
    let bin = exe.parent().unwrap().join("portfleet-controller");
    assert!(bin.exists(), "build it first: cargo build --release -p portfleet-controller");
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let c = &broker.config;
    let child = std::process::Command::new(bin)
        .args(["serve", "--insecure", "--database-url", db.url(), "--listen", &format!("127.0.0.1:{port}")])
        .args(["--amqp-url", &c.url, "--amqp-exchange", &c.exchange, "--amqp-queue", &c.queue])
        .args(["--amqp-dead-letter-exchange", &c.dead_letter_exchange, "--amqp-events-exchange", &c.events_exchange])
        .args(["--db-pool-size", "16", "--allow", "198.51.100.0/24"])
        .args(["--amqp-prefetch", &prefetch.to_string()])
        .env("RUST_LOG", std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()))
        .spawn()
        .unwrap();
    let child = Child(child);
    broker.wait_ready().await;
    let pool = sqlx::PgPool::connect(db.url()).await.unwrap();
    if memory {
        memory_phase(&broker, &pool, child.0.id()).await;
        return;
    }

    // Phase 1: a burst.
    let start = Instant::now();
    for i in 0..burst {
        publish(&broker, i, "burst").await;
    }
    broker.channel.wait_for_confirms().await.unwrap();
    let published = start.elapsed();
    while count(&pool, "burst").await < burst as i64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rate = burst as f64 / elapsed;

    // Phase 2: a steady rate. Commit times come from the controller's
    // NOTIFY, which Postgres delivers only once the transaction commits.
    let listener = CommitListener::start(db.url()).await;
    let total = paced * seconds;
    let interval = Duration::from_secs_f64(1.0 / paced as f64);
    let t0 = Instant::now();
    for i in 0..total {
        let due = t0 + interval.mul_f64(i as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            tokio::time::sleep(wait).await;
        }
        publish(&broker, i, "paced").await;
    }
    broker.channel.wait_for_confirms().await.unwrap();
    while count(&pool, "paced").await < total as i64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let commits = listener.abort_and_collect().await;
    // One notification per committing transaction, naming the smallest new
    // scan id in it; every scan of that transaction committed at that time.
    // created_at is the transaction's start: it splits the latency into
    // delivery (broker to consumer) and storing (transaction to commit).
    let rows: Vec<(String, String, i64)> = sqlx::query_as(
        "SELECT min(id::text) OVER (PARTITION BY created_at), labels->>'sent_us',
                (extract(epoch FROM created_at) * 1000000)::bigint
         FROM scans WHERE labels->>'phase' = 'paced'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut lat: Vec<f64> = Vec::with_capacity(rows.len());
    let mut delivery: Vec<f64> = Vec::with_capacity(rows.len());
    for (first, sent, began) in &rows {
        let committed =
            commits.get(first).unwrap_or_else(|| panic!("no commit notification for the transaction of {first}"));
        let sent = sent.parse::<i64>().unwrap();
        lat.push((committed - sent) as f64 / 1000.0);
        delivery.push((began - sent) as f64 / 1000.0);
    }
    lat.sort_by(f64::total_cmp);
    delivery.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    let dpct = |p: f64| delivery[((delivery.len() as f64 - 1.0) * p).round() as usize];
    drop(child);
    println!("ingress: ack after commit, prefetch {prefetch}, one controller");
    println!(
        "  burst of {burst}: published in {:.2} s, all committed after {elapsed:.2} s: {rate:.0} requests/s",
        published.as_secs_f64()
    );
    println!("  vs NaabuM8's 1000/s: {:.1}x; vs goal 5000/s: {:.2}x", rate / 1000.0, rate / 5000.0);
    println!(
        "  paced at {paced}/s for {seconds} s: publish -> committed p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(0.5),
        pct(0.95),
        pct(0.99),
        lat.last().copied().unwrap_or(0.0)
    );
    println!(
        "    of which publish -> transaction began (broker, delivery, batching window): p50 {:.1} ms, p95 {:.1} ms",
        dpct(0.5),
        dpct(0.95)
    );
    println!("  p95 vs NaabuM8's 100 ms: {:.2}x; vs goal 20 ms: {:.2}x", pct(0.95) / 100.0, pct(0.95) / 20.0);
}
