//! The metrics and health port both binaries serve (`--metrics-listen`):
//! Prometheus text format on `/metrics` (the `metrics` facade and
//! `metrics-exporter-prometheus`, never a hand-written exposition), process
//! figures (RSS, CPU) collected on each scrape, liveness on `/healthz` and
//! readiness on `/readyz` (plus `/health` and `/ready`, the paths
//! NaabuM8's Kubernetes manifests probe).
//!
//! Without `--metrics-listen` no recorder is installed and every
//! `metrics::counter!` in the code is a no-op.

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Histogram buckets for latencies, in seconds: 0.5 ms to 5 minutes (a
/// stream's lifetime beyond that lands in `+Inf`).
const LATENCY_BUCKETS: [f64; 18] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0];

/// How often histograms and idle series are tidied (the exporter needs it
/// when it does not run its own listener).
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("--metrics-listen {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("metrics recorder: {0}")]
    Recorder(String),
}

/// The installed recorder: renders the exposition and collects process
/// figures on each scrape.
#[derive(Clone)]
pub struct Metrics {
    handle: PrometheusHandle,
    process: Arc<metrics_process::Collector>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

static INSTALLED: OnceLock<Metrics> = OnceLock::new();
/// Held while installing: two controllers starting at once in one process
/// (tests) must not both try.
static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Metrics {
    /// Installs the process-wide recorder once (later calls return the same
    /// one: a test process may start several controllers) and sets
    /// `portfleet_build_info{version}`.
    pub fn install(version: &'static str) -> Result<Metrics, MetricsError> {
        let _installing = INSTALLING.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(m) = INSTALLED.get() {
            return Ok(m.clone());
        }
        let handle = PrometheusBuilder::new()
            .set_buckets(&LATENCY_BUCKETS)
            .map_err(|e| MetricsError::Recorder(e.to_string()))?
            .install_recorder()
            .map_err(|e| MetricsError::Recorder(e.to_string()))?;
        let process = Arc::new(metrics_process::Collector::default());
        process.describe();
        metrics::gauge!("portfleet_build_info", "version" => version).set(1.0);
        Ok(INSTALLED.get_or_init(|| Metrics { handle, process }).clone())
    }

    /// The exposition as a scrape sees it.
    pub fn render(&self) -> String {
        self.process.collect();
        self.handle.render()
    }
}

/// Named readiness checks; `/readyz` is 200 only while all are true (but
/// those a probe excludes, `/readyz?exclude=amqp`) and the process is not
/// shutting down.
#[derive(Clone, Debug, Default)]
pub struct Health {
    checks: Arc<Vec<(&'static str, AtomicBool)>>,
    draining: Arc<AtomicBool>,
}

impl Health {
    /// Checks by name, all failing until set.
    pub fn new(names: &[&'static str]) -> Health {
        Health {
            checks: Arc::new(names.iter().map(|n| (*n, AtomicBool::new(false))).collect()),
            draining: Arc::default(),
        }
    }

    /// Shutdown began: not ready from now on, whatever the checks say, so
    /// load balancers stop sending new work while calls drain.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    /// Sets a check; names not given to [`Health::new`] are ignored (a
    /// component that is not configured has no say).
    pub fn set(&self, name: &str, ok: bool) {
        if let Some((_, v)) = self.checks.iter().find(|(n, _)| *n == name) {
            v.store(ok, Ordering::Relaxed);
        }
    }

    pub fn ready(&self) -> bool {
        self.ready_without(&[])
    }

    /// Ready when every check but those named in `excluded` passes.
    fn ready_without(&self, excluded: &[&str]) -> bool {
        !self.draining.load(Ordering::Relaxed)
            && self.checks.iter().all(|(n, v)| excluded.contains(n) || v.load(Ordering::Relaxed))
    }

    /// One `name: ok|failing` line per check (`(excluded)` after those the
    /// probe left out), and `shutting down` while draining.
    fn report(&self, excluded: &[&str]) -> String {
        let mut out: String = self
            .checks
            .iter()
            .map(|(n, v)| {
                let state = if v.load(Ordering::Relaxed) { "ok" } else { "failing" };
                let note = if excluded.contains(n) { " (excluded)" } else { "" };
                format!("{n}: {state}{note}\n")
            })
            .collect();
        if self.draining.load(Ordering::Relaxed) {
            out.push_str("shutting down\n");
        }
        out
    }
}

/// Binds `addr` now, so a port in use is a start-up error, and returns the
/// listener for [`serve`].
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr).await.map_err(|source| MetricsError::Bind { addr, source })
}

#[derive(Clone)]
struct AppState {
    metrics: Metrics,
    health: Health,
}

/// Serves `/metrics`, `/healthz`, `/health`, `/readyz` and `/ready` on
/// `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, metrics: Metrics, health: Health, shutdown: CancellationToken) {
    let upkeep = {
        let (handle, shutdown) = (metrics.handle.clone(), shutdown.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => handle.run_upkeep(),
                }
            }
        })
    };
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(alive))
        .route("/health", get(alive))
        .route("/readyz", get(ready))
        .route("/ready", get(ready))
        .with_state(AppState { metrics, health });
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics and health checks");
    }
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
    if let Err(error) = served {
        tracing::warn!(%error, "metrics listener failed");
    }
    upkeep.abort();
}

async fn scrape(State(s): State<AppState>) -> ([(&'static str, &'static str); 1], String) {
    // Rendering walks every series: off the async threads.
    let metrics = s.metrics.clone();
    let body = tokio::task::spawn_blocking(move || metrics.render()).await.unwrap_or_default();
    ([("content-type", "text/plain; version=0.0.4; charset=utf-8")], body)
}

async fn alive() -> &'static str {
    "ok\n"
}

async fn ready(State(s): State<AppState>, uri: axum::http::Uri) -> (StatusCode, String) {
    // `?exclude=NAME` (may repeat), as Kubernetes' own /readyz takes it.
    let excluded: Vec<&str> =
        uri.query().unwrap_or("").split('&').filter_map(|kv| kv.strip_prefix("exclude=")).collect();
    let code = if s.health.ready_without(&excluded) { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, s.health.report(&excluded))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_check_passes() {
        let h = Health::new(&["postgres", "migrations"]);
        assert!(!h.ready());
        h.set("postgres", true);
        h.set("not-configured", false);
        assert!(!h.ready());
        h.set("migrations", true);
        assert!(h.ready());
        assert_eq!(h.report(&[]), "postgres: ok\nmigrations: ok\n");
        h.set("postgres", false);
        assert!(!h.ready());
        assert!(h.ready_without(&["postgres"]));
        assert_eq!(h.report(&["postgres"]), "postgres: failing (excluded)\nmigrations: ok\n");
        assert!(Health::new(&[]).ready());
        h.drain();
        assert!(!h.ready_without(&["postgres"]), "never ready while shutting down");
        assert!(h.report(&[]).ends_with("shutting down\n"));
    }

    #[tokio::test]
    async fn serves_metrics_and_health() {
        let metrics = Metrics::install("test").unwrap();
        metrics::counter!("portfleet_test_total").increment(3);
        metrics::histogram!("portfleet_test_seconds").record(0.002);
        let health = Health::new(&["postgres"]);
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(listener, metrics, health.clone(), shutdown.clone()));
        let get = |path: &'static str| async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
                .await
                .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let body = get("/metrics").await;
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("portfleet_test_total 3"), "{body}");
        assert!(body.contains("portfleet_test_seconds_bucket{le=\"0.0025\"} 1"), "{body}");
        assert!(body.contains("portfleet_build_info{version=\"test\"} 1"), "{body}");
        assert!(body.contains("process_resident_memory_bytes"), "{body}");
        for path in ["/healthz", "/health"] {
            assert!(get(path).await.starts_with("HTTP/1.1 200"));
        }
        for path in ["/readyz", "/ready"] {
            let r = get(path).await;
            assert!(r.starts_with("HTTP/1.1 503") && r.contains("postgres: failing"), "{r}");
        }
        let r = get("/readyz?exclude=postgres").await;
        assert!(r.starts_with("HTTP/1.1 200") && r.contains("postgres: failing (excluded)"), "{r}");
        health.set("postgres", true);
        assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
        health.drain();
        assert!(get("/ready").await.starts_with("HTTP/1.1 503"));
        assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        shutdown.cancel();
        server.await.unwrap();
    }
}
