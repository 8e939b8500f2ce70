//! The RabbitMQ trigger ingress: scan requests consumed from AMQP (native
//! schema v1, and NaabuM8's envelopes), lifecycle events published back.
//! See docs/amqp.md.
//!
//! One supervisor task owns the broker connection: it declares the
//! topology, runs a consumer per request queue and the event publisher,
//! and when anything fails it closes the connection (the broker requeues
//! whatever was not acked) and starts over with backoff. Everything stops
//! under the controller's cancellation token.

mod consumer;
pub mod messages;
mod publisher;
mod topology;

use std::{sync::Arc, time::Duration};

use lapin::{Connection, ConnectionProperties, types::ShortString};
use portfleet_core::backoff::Backoff;
use tokio_util::sync::CancellationToken;

pub use messages::NaabuDefaults;
pub use publisher::{event_body, event_body_with, naabum8_completion};

use crate::{
    notify::Notifier,
    scans::ScanManager,
    store::{NaabuM8Db, Store},
};

/// 256 KiB: some 15,000 targets (more belong in a target group).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 256 << 10;
/// With the size limit, at most 128 MiB of request bodies in hand. Less
/// prefetch starves the batches: the broker sends more only as acks
/// return (measured: 128 gave 2,300 requests/s, 512 gave 6,000-7,000).
pub const DEFAULT_PREFETCH: u16 = 512;

#[derive(Clone, Debug)]
pub struct IngressConfig {
    pub url: String,
    /// Topic exchange requests are published to.
    pub exchange: String,
    pub routing_key: String,
    pub queue: String,
    /// Where rejected requests go (`<queue>.dlq` by routing key).
    pub dead_letter_exchange: String,
    /// Topic exchange for scan.created/completed/failed/cancelled.
    pub events_exchange: String,
    /// Unacked requests in hand at once, per queue. With
    /// `max_message_bytes`, bounds the memory requests can take.
    pub prefetch: u16,
    /// Larger message bodies are dead-lettered unparsed.
    pub max_message_bytes: usize,
    /// Attempts before a request that keeps failing is dead-lettered.
    pub delivery_limit: u32,
    pub naabum8: Option<NaabuM8Config>,
    /// How the broker names our connection (rabbitmqctl list_connections).
    pub connection_name: String,
}

#[derive(Clone, Debug)]
pub struct NaabuM8Config {
    pub exchange: String,
    pub queue: String,
    pub binding: String,
    /// Routing key of the completion message (NaabuM8 notified katanam8).
    pub completion_key: String,
    pub defaults: NaabuDefaults,
    /// NaabuM8's database: hostnames are read from it and results written
    /// to it (`crate::naabum8`).
    pub database: Option<sqlx::postgres::PgConnectOptions>,
}

impl IngressConfig {
    /// The documented defaults; publishers rely on these names.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            exchange: "portfleet".into(),
            routing_key: "scan.request".into(),
            queue: "portfleet.scan.requests".into(),
            dead_letter_exchange: "portfleet.dlx".into(),
            events_exchange: "portfleet.events".into(),
            prefetch: DEFAULT_PREFETCH,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            delivery_limit: 5,
            naabum8: None,
            connection_name: "portfleet-controller".into(),
        }
    }
}

impl Default for NaabuM8Config {
    fn default() -> Self {
        Self {
            exchange: "cptm8".into(),
            queue: "qnaabum8".into(),
            binding: "cptm8.naabum8.#".into(),
            completion_key: "cptm8.katanam8.get.scan".into(),
            defaults: NaabuDefaults { ports: "top-100".into(), rate: 1000, hostname_table: false },
            database: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngressError {
    #[error("AMQP: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("the broker refused {0}")]
    Nacked(String),
    #[error("the broker cancelled the consumer of {0}")]
    ConsumerEnded(String),
}

/// What the ingress tasks share.
pub struct Ingress {
    pub config: IngressConfig,
    pub scans: ScanManager,
    pub store: Store,
    pub notifier: Notifier,
    /// NaabuM8's database, when `--naabum8-database-url` is set.
    pub naabum8_db: Option<NaabuM8Db>,
    attempts: consumer::Attempts,
}

/// Runs the ingress until `cancel`, reconnecting with backoff.
pub async fn run(
    config: IngressConfig,
    scans: ScanManager,
    store: Store,
    notifier: Notifier,
    naabum8_db: Option<NaabuM8Db>,
    readiness: portfleet_telemetry::metrics::Health,
    cancel: CancellationToken,
) {
    let ingress = Arc::new(Ingress { config, scans, store, notifier, naabum8_db, attempts: Default::default() });
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    loop {
        let started = tokio::time::Instant::now();
        let failed = match session(&ingress, &readiness, &cancel).await {
            Ok(()) => return,
            Err(e) => e,
        };
        // A connection that lasted a while starts the schedule over.
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        let retry_in = backoff.next_delay();
        tracing::warn!(error = %failed, ?retry_in, "AMQP ingress interrupted; reconnecting");
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(retry_in) => {}
        }
    }
}

/// One connection's life: Ok only when cancelled.
async fn session(
    ingress: &Arc<Ingress>,
    readiness: &portfleet_telemetry::metrics::Health,
    cancel: &CancellationToken,
) -> Result<(), IngressError> {
    let props = ConnectionProperties::default().with_connection_name(ingress.config.connection_name.as_str().into());
    let conn = tokio::select! {
        _ = cancel.cancelled() => return Ok(()),
        c = Connection::connect(&ingress.config.url, props) => Arc::new(c?),
    };
    let result = serve(&conn, ingress, readiness, cancel).await;
    readiness.set("amqp", false);
    metrics::gauge!("portfleet_amqp_connected").set(0.0);
    // Whatever was not acked goes back to the queue with the connection.
    let _ =
        tokio::time::timeout(Duration::from_secs(5), conn.close(200, ShortString::from("portfleet stopping"))).await;
    result
}

async fn serve(
    conn: &Arc<Connection>,
    ingress: &Arc<Ingress>,
    readiness: &portfleet_telemetry::metrics::Health,
    cancel: &CancellationToken,
) -> Result<(), IngressError> {
    let queues = topology::declare(conn, &ingress.config).await?;
    let dead = Arc::new(consumer::DeadLetters::open(conn, &ingress.config).await?);
    // A failing task stops its siblings: the session restarts as a whole.
    let stop = cancel.child_token();
    let mut tasks = tokio::task::JoinSet::new();
    for q in queues {
        let (conn, ingress, dead, stop) = (conn.clone(), ingress.clone(), dead.clone(), stop.clone());
        let span = tracing::info_span!("ingress.consumer", queue = %q.name);
        tasks.spawn(tracing::Instrument::instrument(
            async move { consumer::run(&conn, q, ingress, dead, stop).await },
            span,
        ));
    }
    {
        let (conn, ingress, stop) = (conn.clone(), ingress.clone(), stop.clone());
        tasks.spawn(async move { publisher::run(&conn, ingress, stop).await });
    }
    tracing::info!(url = %redact(&ingress.config.url), "AMQP ingress connected");
    readiness.set("amqp", true);
    metrics::gauge!("portfleet_amqp_connected").set(1.0);
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.unwrap_or_else(|e| Err(IngressError::ConsumerEnded(format!("task panicked: {e}"))));
        if let Err(e) = outcome {
            if result.is_ok() {
                result = Err(e);
            }
            stop.cancel();
        }
    }
    dead.close().await;
    if cancel.is_cancelled() { Ok(()) } else { result }
}

/// The URL without its password, for logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            let user = creds.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn urls_are_logged_without_passwords() {
        assert_eq!(super::redact("amqp://guest:secret@host:5672/%2f"), "amqp://guest:***@host:5672/%2f");
        assert_eq!(super::redact("amqp://host"), "amqp://host");
    }
}
