//! What `grpc.health.v1` says: SERVING while the database answers,
//! NOT_SERVING while it does not - for the whole server (`""`, what load
//! balancers and `grpc_health_probe` ask) and for every service, all set
//! together. The API keeps answering meanwhile (UNAVAILABLE).
//!
//! One task owns a connection of its own (not the pool's: a pool busy with
//! long queries is not a database that is down) and pings on it with a short
//! timeout: every second while serving, at once when the store classifies
//! an error as `Unavailable` ([`crate::store::unavailable_hint`]; a hint to
//! check, never a verdict), and every 500 ms while not serving, so a
//! recovery shows within about a second.

use std::time::Duration;

use sqlx::{Connection, PgConnection, postgres::PgConnectOptions};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic_health::{ServingStatus, server::HealthReporter};

/// How often the database is pinged while it answers.
const CHECK_WHILE_SERVING: Duration = Duration::from_secs(1);
/// How often it is tried while it does not.
const CHECK_WHILE_DOWN: Duration = Duration::from_millis(500);
/// A ping on the open connection must answer within this long.
const PING_TIMEOUT: Duration = Duration::from_secs(1);
/// A new connection (TCP, TLS, authentication) must be made within this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Hints closer together than this are taken as one: a storm of failing
/// calls must not turn into a storm of pings.
const MIN_HINT_SPACING: Duration = Duration::from_millis(100);

/// Sets `services` (and the server-wide `""`) SERVING or NOT_SERVING as the
/// database at `options` answers or not, until `cancel`.
pub async fn watch_database(
    options: PgConnectOptions,
    health: HealthReporter,
    readiness: portfleet_telemetry::metrics::Health,
    services: Vec<&'static str>,
    cancel: CancellationToken,
) {
    let mut names = vec![""];
    names.extend(services);
    let hint = crate::store::unavailable_hint();
    let mut probe = Probe { options, conn: None };
    let mut serving = true;
    let mut last_check = Instant::now();
    loop {
        let interval = if serving { CHECK_WHILE_SERVING } else { CHECK_WHILE_DOWN };
        tokio::select! {
            _ = cancel.cancelled() => break,
            _ = tokio::time::sleep_until(last_check + interval) => {}
            // While down, the short interval already re-checks.
            _ = async {
                hint.notified().await;
                tokio::time::sleep_until(last_check + MIN_HINT_SPACING).await;
            }, if serving => {}
        }
        last_check = Instant::now();
        let result = tokio::select! {
            _ = cancel.cancelled() => break,
            r = probe.check() => r,
        };
        match (serving, result) {
            (true, Err(error)) => {
                serving = false;
                readiness.set("postgres", false);
                tracing::warn!(%error, "database unreachable: health NOT_SERVING");
                report(&health, &names, ServingStatus::NotServing).await;
            }
            (false, Ok(())) => {
                serving = true;
                readiness.set("postgres", true);
                tracing::info!("database reachable again: health SERVING");
                report(&health, &names, ServingStatus::Serving).await;
            }
            _ => {}
        }
    }
    if let Some(conn) = probe.conn.take() {
        let _ = tokio::time::timeout(Duration::from_secs(1), conn.close()).await;
    }
}

async fn report(health: &HealthReporter, names: &[&str], status: ServingStatus) {
    for name in names {
        health.set_service_status(*name, status).await;
    }
}

/// The health task's own connection, made when needed.
struct Probe {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
}

impl Probe {
    /// Pings on the open connection; when there is none or it fails (e.g.
    /// it did not survive a database restart), tries a new one before
    /// saying the database is down.
    async fn check(&mut self) -> Result<(), String> {
        if let Some(conn) = self.conn.as_mut() {
            match tokio::time::timeout(PING_TIMEOUT, conn.ping()).await {
                Ok(Ok(())) => return Ok(()),
                Ok(Err(e)) => tracing::debug!(error = %e, "health ping failed; reconnecting"),
                Err(_) => tracing::debug!(timeout = ?PING_TIMEOUT, "health ping timed out; reconnecting"),
            }
            // Dropped, not closed: it is broken or stuck.
            self.conn = None;
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&self.options)).await {
            Ok(Ok(conn)) => {
                self.conn = Some(conn);
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no connection within {CONNECT_TIMEOUT:?}")),
        }
    }
}
