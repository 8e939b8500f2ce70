//! The controller run in-process through the same `run` the binary calls,
//! on a port-0 listener, driven over real TCP.

use std::{net::SocketAddr, time::Duration};

use portfleet_controller::{
    ControllerConfig, ControllerError,
    auth::{self, Scope},
    store::{DatabaseConfig, Store},
};
use portfleet_proto::auth::{ApiClient, Bearer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::eventually;

/// A controller's defaults, with a scope policy that allows every address
/// the tests name, loopback included (TEST-NET addresses are never probed:
/// the in-process tests' agents are simulated; real scans go to network
/// namespaces the tests build).
pub fn controller_config(database: sqlx::postgres::PgConnectOptions) -> ControllerConfig {
    let mut c = ControllerConfig::new(database);
    c.policy.allow = portfleet_core::policy::parse_cidrs("0.0.0.0/0,::/0,127.0.0.0/8,::1/128").expect("cidrs");
    c
}

pub struct TestController {
    pub addr: SocketAddr,
    /// An admin API token, which [`Self::client`] sends.
    pub token: String,
    database: DatabaseConfig,
    /// The CA clients trust when the controller serves TLS.
    ca: Option<Vec<u8>>,
    cancel: CancellationToken,
    handle: Option<JoinHandle<Result<(), ControllerError>>>,
}

impl TestController {
    /// Starts a controller and waits until its health service answers.
    pub async fn start(config: ControllerConfig) -> Self {
        Self::start_with_ca(config, None).await
    }

    /// Starts a controller serving TLS (`config.tls`) whose certificate
    /// `ca_pem` signed; clients of this harness trust it.
    pub async fn start_tls(config: ControllerConfig, ca_pem: &[u8]) -> Self {
        Self::start_with_ca(config, Some(ca_pem.to_vec())).await
    }

    async fn start_with_ca(config: ControllerConfig, ca: Option<Vec<u8>>) -> Self {
        crate::init_tracing();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let cancel = CancellationToken::new();
        let (database, health) = (config.database.clone(), config.health);
        let handle = tokio::spawn(portfleet_controller::run(config, listener, cancel.clone()));
        let mut this = Self { addr, token: String::new(), database, ca, cancel, handle: Some(handle) };
        this.wait_serving(health).await;
        this.token = this.new_token(Scope::Admin).await;
        this
    }

    /// A new API token of `scope`, made in the database as
    /// `portfleet-controller tokens create` makes it.
    pub async fn new_token(&self, scope: Scope) -> String {
        let store = Store::connect_lazy(&self.database);
        let t = auth::create_token(&store, "test", scope, None).await.expect("create token");
        store.close().await;
        t.token
    }

    pub fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// A connection as this harness's clients make it (TLS when served).
    pub async fn try_channel(&self) -> Result<Channel, tonic::transport::Error> {
        let mut endpoint = Channel::from_shared(self.url()).expect("url");
        if let Some(ca) = &self.ca {
            endpoint = endpoint.tls_config(portfleet_proto::auth::client_tls(ca, None))?;
        }
        endpoint.connect().await
    }

    pub async fn channel(&self) -> Channel {
        self.try_channel().await.expect("connect to controller")
    }

    /// A ScanService client with an admin token.
    pub async fn client(&self) -> ApiClient {
        self.client_with(&self.token).await
    }

    /// A ScanService client sending `token` (none when empty).
    pub async fn client_with(&self, token: &str) -> ApiClient {
        portfleet_proto::auth::client(self.channel().await, Bearer::new(token).expect("token"))
    }

    /// Until health says SERVING, or without health, until the API
    /// answers (refusing a call without a token).
    async fn wait_serving(&self, health: bool) {
        eventually("the controller serving", Duration::from_secs(30), || async move {
            let channel = self.try_channel().await.ok()?;
            if !health {
                let mut api = portfleet_proto::auth::client(channel, Bearer::new("").expect("no token"));
                let err = api.list_scans(portfleet_proto::v1::ListScansRequest::default()).await.err()?;
                return (err.code() == tonic::Code::Unauthenticated).then_some(());
            }
            let resp = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.ok()?;
            (resp.into_inner().status == 1).then_some(())
        })
        .await;
    }

    /// Graceful shutdown; returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), ControllerError> {
        self.cancel.cancel();
        let handle = self.handle.take().expect("running");
        tokio::time::timeout(Duration::from_secs(30), handle)
            .await
            .expect("controller stopped within 30s")
            .expect("controller task did not panic")
    }
}

impl Drop for TestController {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}
