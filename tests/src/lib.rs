//! Harness for portfleet's integration tests: a fresh Postgres database per
//! test, the controller run in-process on a port-0 listener or as the real
//! binary, a TCP proxy that can cut a connection path, and `eventually`.
//!
//! The services are real (Postgres on 127.0.0.1:5432, RabbitMQ on
//! 127.0.0.1:5672); `scripts/test.sh` starts them when they are installed
//! but stopped. Nothing here fakes a component.

pub mod amqp;
pub mod controller;
pub mod db;
pub mod dns;
pub mod fake_agent;
pub mod netns;
pub mod otlp;
pub mod pgcluster;
pub mod procs;
pub mod proxy;

use std::{future::Future, path::PathBuf, time::Duration};

pub use controller::{TestController, controller_config};
pub use db::TestDb;
pub use proxy::TcpProxy;

/// Logs to the test's captured output once per process; `RUST_LOG` filters.
pub fn init_tracing() {
    // No colour: a failing test's captured output is read as plain text.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_ansi(false)
        .fmt_fields(portfleet_telemetry::SafeFields)
        .with_test_writer()
        .try_init();
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Polls `check` until it returns `Some`, or panics with `what` after
/// `timeout`. Never a bare sleep: tests wait for the condition itself.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `GET path` from an HTTP server (the metrics and health port,
/// Prometheus's API): status and body, or `None` when it cannot be reached
/// within a few seconds. HTTP/1.0, so no chunked body to undo.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = tokio::net::TcpStream::connect(addr);
    let mut s = tokio::time::timeout(Duration::from_secs(2), connect).await.ok()?.ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw)).await.ok()?.ok()?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}

/// Waits until the controller at `url` says SERVING on grpc.health.v1
/// (its migrations are applied and it takes calls).
pub async fn wait_serving(url: &str, what: &str) {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    eventually(what, Duration::from_secs(30), || async move {
        let ch = tonic::transport::Channel::from_shared(url.to_string()).ok()?.connect().await.ok()?;
        let r = HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await.ok()?;
        (r.into_inner().status == 1).then_some(())
    })
    .await
}

/// SIGTERM to `child`, then its exit status (within 15 s, else a panic).
pub async fn terminate(child: &mut std::process::Child) -> std::process::ExitStatus {
    let killed = std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
    assert!(killed.is_ok_and(|s| s.success()), "kill -TERM {}", child.id());
    eventually("exit after SIGTERM", Duration::from_secs(15), || {
        let s = child.try_wait().expect("wait for the child");
        async move { s }
    })
    .await
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // The owner of /proc/self is the process's effective user.
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// Path of a workspace binary built next to the test executable.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build --workspace`, which scripts/test.sh does)",
        path.display()
    );
    path
}
