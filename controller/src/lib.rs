//! The portfleet controller: keeps targets, scans and results in Postgres,
//! serves the `portfleet.v1` gRPC API, and hands scan work to agents.
//!
//! Layout: `store` owns all SQL; `scans` is the domain (validation, DNS,
//! planning); `api` adapts gRPC to it. [`run`] wires them together and is
//! what both the binary and the integration tests call.

#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod config;
pub mod conn;
pub mod diff;
pub mod enroll;
pub mod health;
pub mod ingress;
pub mod inventory;
pub mod metrics;
pub mod naabum8;
pub mod notify;
pub mod plans;
pub mod policy;
pub mod politeness;
pub mod prune;
pub mod scans;
pub mod scheduler;
pub mod schedules;
pub mod sessions;
pub mod store;
pub mod telemetry;
pub mod webhooks;

use std::time::Duration;

use std::sync::Arc;

use portfleet_proto::v1::{agent_service_server::AgentServiceServer, scan_service_server::ScanServiceServer};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::server::NamedService;

pub use config::ControllerConfig;
use store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error(transparent)]
    Metrics(#[from] portfleet_telemetry::metrics::MetricsError),
}

/// The CA that signs enrolling agents, when its key is configured.
fn agent_ca(config: &ControllerConfig) -> Result<Option<Arc<enroll::AgentCa>>, ControllerError> {
    let Some(tls) = &config.tls else { return Ok(None) };
    let (Some(cert), Some(key)) = (&tls.client_ca, &tls.client_ca_key) else { return Ok(None) };
    let ca = enroll::AgentCa::load(cert, key, tls.agent_cert_ttl).map_err(|e| ControllerError::Tls(e.to_string()))?;
    Ok(Some(Arc::new(ca)))
}

fn sessions_config(config: &ControllerConfig) -> config::FleetConfig {
    let mut fleet = config.fleet.clone();
    fleet.require_client_cert |= config.tls.as_ref().is_some_and(|t| t.client_ca.is_some());
    fleet
}

/// HTTP/2 streams one connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 128;

/// Reads the PEM files into tonic's server TLS settings. Client
/// certificates are optional at the TLS layer (operators' clients use
/// tokens); the agent service demands one when a client CA is set. A
/// handshake must finish within `timeout` (`--handshake-timeout`, which
/// `conn` also enforces on the socket).
fn server_tls(
    files: &config::TlsFiles,
    timeout: Duration,
) -> Result<tonic::transport::ServerTlsConfig, ControllerError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    let read =
        |p: &std::path::Path| std::fs::read(p).map_err(|e| ControllerError::Tls(format!("{}: {e}", p.display())));
    let identity = Identity::from_pem(read(&files.cert)?, read(&files.key)?);
    let mut tls = ServerTlsConfig::new().identity(identity).timeout(timeout);
    if let Some(ca) = &files.client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca)?)).client_auth_optional(true);
    }
    Ok(tls)
}

/// Applies migrations and serves the API on `listener` until `shutdown` is
/// cancelled, then drains in-flight calls (bounded by the configured
/// timeout) and closes the pool. Returns `Ok` on a clean shutdown, also
/// when cancelled while still waiting for the database.
pub async fn run(
    config: ControllerConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ControllerError> {
    // The metrics and health port first: `/healthz` answers and `/readyz`
    // says why not while migrations run or the database is away.
    let readiness = {
        let mut checks = vec!["postgres", "migrations"];
        if config.ingress.is_some() {
            checks.push("amqp");
        }
        portfleet_telemetry::metrics::Health::new(&checks)
    };
    let metrics_stop = CancellationToken::new();
    let metrics_server = match config.metrics_listen {
        Some(addr) => {
            let metrics = portfleet_telemetry::metrics::Metrics::install(env!("CARGO_PKG_VERSION"))?;
            let listener = portfleet_telemetry::metrics::bind(addr).await?;
            Some(tokio::spawn(portfleet_telemetry::metrics::serve(
                listener,
                metrics,
                readiness.clone(),
                metrics_stop.clone(),
            )))
        }
        None => None,
    };
    let _stop_metrics = metrics_stop.clone().drop_guard();
    {
        // Not ready from the first moment of shutdown: new work goes
        // elsewhere while in-flight calls drain.
        let (readiness, shutdown, stop) = (readiness.clone(), shutdown.clone(), metrics_stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => readiness.drain(),
                _ = stop.cancelled() => {}
            }
        });
    }
    // Two pools: the fleet's (agent sessions, scheduler, upkeep,
    // notifications) and the API clients' (ScanService, WatchScan, the
    // AMQP ingress), so no client load can take the agent protocol's
    // connections.
    let store = Store::connect_lazy(&config.database);
    // API calls come and go: keep two connections warm so a call after a
    // quiet spell does not wait for new ones (the fleet's pool stays busy).
    let api_store = Store::connect_lazy_warm(
        &store::DatabaseConfig { pool_size: config.api.db_pool_size, ..config.database.clone() },
        2,
    );
    match store.migrate(&shutdown).await {
        Ok(()) => {}
        Err(StoreError::Cancelled) => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    readiness.set("postgres", true);
    api_store.warm_up(2).await;
    store.add_scope_rules(store::ScopeAction::Allow, &config.policy.allow).await?;
    store.add_scope_rules(store::ScopeAction::Deny, &config.policy.deny).await?;
    store.set_rate_caps(config.rate_caps).await?;
    if let Some(config::Retention(keep)) = config.retain_scans {
        store.set_retention(keep).await?;
    }
    let rules = store.scope_rules().await?;
    let caps = store.rate_caps().await?;
    if rules.allow.is_empty() {
        tracing::warn!("the scope policy allows nothing: every scan will be refused until `serve --allow CIDR,...`");
    } else {
        let (allow, deny) = (config::CidrList(rules.allow.clone()), config::CidrList(rules.deny.clone()));
        tracing::info!(%allow, %deny, max_rate_per_host = caps.per_host,
            max_rate_per_block = caps.per_block, "scope policy");
    }
    match listener.local_addr() {
        Ok(addr) => tracing::info!(%addr, "controller serving"),
        Err(_) => tracing::info!("controller serving"),
    }
    conn::raise_open_files_limit(&config.connections);
    let connections = conn::Connections::new(config.connections.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<ScanServiceServer<api::ScanApi>>().await;
    health.set_serving::<AgentServiceServer<api::AgentApi>>().await;
    let tasks = TaskTracker::new();
    // Background work stops before the pool closes.
    let background = shutdown.child_token();
    tasks.spawn(health::watch_database(
        config.database.options.clone(),
        health.clone(),
        readiness.clone(),
        vec![ScanServiceServer::<api::ScanApi>::NAME, AgentServiceServer::<api::AgentApi>::NAME],
        background.clone(),
    ));
    let notifier = notify::Notifier::start(store.pool().clone(), background.clone(), &tasks);
    let fleet = Arc::new(sessions::Fleet {
        store: store.clone(),
        registry: sessions::Registry::default(),
        plans: plans::ScanPlans::new(store.clone()),
        config: sessions_config(&config),
        notifier: notifier.clone(),
        wake: tokio::sync::Notify::new(),
        shutdown: background.clone(),
        tracker: tasks.clone(),
        agent_ca: agent_ca(&config)?,
    });
    tasks.spawn(scheduler::run(fleet.clone()));
    // The inventory, webhooks and the pruner on a small pool of their own:
    // their transactions can never take the agent protocol's connections.
    let upkeep = Store::connect_lazy(&store::DatabaseConfig { pool_size: 3, ..config.database.clone() });
    if config.inventory {
        tasks.spawn(inventory::run(upkeep.clone(), fleet.plans.clone(), notifier.clone(), background.clone()));
    }
    tasks.spawn(webhooks::run(upkeep.clone(), background.clone()));
    tasks.spawn(prune::run(upkeep.clone(), background.clone()));
    if config.metrics_listen.is_some() {
        let pools = vec![("fleet", store.clone()), ("api", api_store.clone()), ("upkeep", upkeep.clone())];
        tasks.spawn(metrics::sample(upkeep.clone(), pools, background.clone()));
    }
    tracing::info!(controller_id = %config.fleet.controller_id, "fleet scheduler started");

    // Both reflection versions: grpcurl 1.8 and many tools speak only v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(portfleet_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let mut scans = scans::ScanManager::new(api_store.clone(), config.limits.clone());
    let naabum8_db =
        config.ingress.as_ref().and_then(|i| i.naabum8.as_ref()).and_then(|n| n.database.clone()).map(|options| {
            store::NaabuM8Db::connect_lazy(&store::DatabaseConfig { options, pool_size: 2, ..config.database.clone() })
        });
    if let Some(db) = &naabum8_db {
        scans = scans.with_naabum8(db.clone());
    }
    if let Some(mut ingress) = config.ingress.clone() {
        ingress.connection_name = format!("{} {}", ingress.connection_name, config.fleet.controller_id);
        let (store, notifier) = (api_store.clone(), notifier.clone());
        let ready = readiness.clone();
        tasks.spawn(ingress::run(
            ingress,
            scans.clone(),
            store,
            notifier,
            naabum8_db.clone(),
            ready,
            background.clone(),
        ));
    }
    // Every controller fires schedules; the store's claims keep each due
    // time to one of them.
    tasks.spawn(schedules::ScheduleManager::new(api_store.clone(), scans.clone()).run(background.clone()));
    let watches = api::WatchHub::new(api_store.clone(), notifier, background.clone(), tasks.clone(), &config.api);
    let scan_api = api::ScanApi::new(scans, api_store.clone(), watches);
    let agent_api = api::AgentApi::new(fleet);

    let mut builder = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        // One connection cannot open streams without bound (an agent needs
        // one, a client a few watches).
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION));
    match &config.tls {
        Some(files) => {
            if files.client_ca.is_none() {
                tracing::warn!(
                    "no --tls-client-ca: agents are not authenticated; anyone who reaches this port can pose as one"
                );
            }
            builder = builder.tls_config(server_tls(files, config.connections.handshake_timeout)?)?;
        }
        None => tracing::warn!("serving plaintext gRPC: tokens, results and agent sessions cross the network in clear"),
    }
    // Ready once the start-up writes are done and calls are served (a
    // database lost before then ends the start, and the process); from
    // here the database watch owns `postgres`.
    readiness.set("migrations", true);
    let server = builder
        // Counts each connection's open calls, for its idle deadline.
        .layer(connections.stream_layer())
        .layer(telemetry::grpc_trace_layer())
        .layer(metrics::GrpcMetricsLayer)
        .add_optional_service(config.health.then_some(health_service))
        .add_optional_service(config.reflection.then_some(reflection_v1))
        .add_optional_service(config.reflection.then_some(reflection_v1alpha))
        .add_service(ScanServiceServer::new(scan_api))
        .add_service(AgentServiceServer::new(agent_api))
        // Admits or refuses each connection, sets TCP_NODELAY (the
        // builder's only applies to listeners tonic binds itself) and
        // closes connections that stay without a call (`conn`).
        .serve_with_incoming_shutdown(connections.incoming(listener), shutdown.clone().cancelled_owned());
    let drain_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(config.shutdown_timeout).await;
    };
    tokio::select! {
        res = server => res?,
        () = drain_deadline => {
            tracing::warn!(timeout = ?config.shutdown_timeout, "in-flight calls outlived the shutdown timeout; dropping them");
        }
    }
    tasks.close();
    if tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await.is_err() {
        tracing::warn!("background tasks did not stop in time");
    }
    let closed = async { tokio::join!(store.close(), api_store.close(), upkeep.close()) };
    if tokio::time::timeout(Duration::from_secs(5), closed).await.is_err() {
        tracing::warn!("database pools did not close in time");
    }
    metrics_stop.cancel();
    if let Some(server) = metrics_server {
        let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    }
    tracing::info!("controller stopped");
    Ok(())
}
