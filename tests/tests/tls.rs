//! TLS and mTLS with real handshakes, certificates made here with rcgen:
//! operators' clients reach ScanService over TLS with a token; plaintext
//! and clients trusting another CA fail; agents need a client certificate
//! from the controller's client CA, and one from another CA fails the
//! handshake.

use std::path::{Path, PathBuf};

use portfleet_controller::config::TlsFiles;
use portfleet_proto::{
    auth::{Bearer, client_tls},
    v1::{
        self as pb, agent_message::Frame as Out, agent_service_client::AgentServiceClient,
        controller_message::Frame as In,
    },
};
use portfleet_tests::{TestController, TestDb, controller_config};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, transport::Channel};

/// A CA that signs leaf certificates.
struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let pem = params.self_signed(&key).unwrap().pem();
        Self { pem, issuer: Issuer::new(params, key) }
    }

    /// A leaf certificate and its key, as PEM.
    fn leaf(&self, cn: &str, sans: &[&str]) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn write(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, pem).unwrap();
    p
}

fn hello() -> pb::AgentMessage {
    pb::AgentMessage {
        frame: Some(Out::Hello(pb::Hello {
            agent_id: uuid::Uuid::new_v4().to_string(),
            name: "tls-agent".into(),
            version: "test".into(),
            min_protocol_version: 1,
            max_protocol_version: 1,
            capabilities: Some(pb::Capabilities { raw_socket: false, ipv6: false }),
            max_shards: 1,
            ..Default::default()
        })),
    }
}

/// Opens an agent session; returns the first frame's outcome.
async fn session(channel: Channel) -> Result<In, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello()).await.unwrap();
    let mut inbound = AgentServiceClient::new(channel).session(ReceiverStream::new(rx)).await?.into_inner();
    let first = inbound.message().await?.and_then(|m| m.frame).expect("a frame");
    drop(tx);
    Ok(first)
}

async fn connect(
    url: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let mut e = Channel::from_shared(url.to_string()).unwrap();
    if let Some(t) = tls {
        e = e.tls_config(t)?;
    }
    e.connect().await
}

#[tokio::test]
async fn tls_for_clients_and_mtls_for_agents() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("portfleet test server CA");
    let agent_ca = Ca::new("portfleet test agent CA");
    let rogue_ca = Ca::new("someone else's CA");
    let (cert, key) = server_ca.leaf("controller", &["127.0.0.1", "localhost"]);
    let db = TestDb::create().await;
    let mut config = controller_config(db.options());
    config.tls = Some(TlsFiles {
        cert: write(dir.path(), "server.pem", &cert),
        key: write(dir.path(), "server.key", &key),
        client_ca: Some(write(dir.path(), "agent-ca.pem", &agent_ca.pem)),
    });
    let c = TestController::start_tls(config, server_ca.pem.as_bytes()).await;
    let url = c.url();
    assert!(url.starts_with("https://"));

    // An operator's client: TLS plus a token, no client certificate.
    let mut api = c.client().await;
    api.list_scans(pb::ListScansRequest::default()).await.unwrap();

    // Plaintext to the TLS port fails.
    let plain = connect(&url.replace("https://", "http://"), None).await;
    if let Ok(ch) = plain {
        let mut p = portfleet_proto::auth::client(ch, Bearer::new(&c.token).unwrap());
        assert!(p.list_scans(pb::ListScansRequest::default()).await.is_err(), "plaintext was served");
    }
    // A client that trusts another CA refuses the controller's certificate.
    let wrong_trust = connect(&url, Some(client_tls(rogue_ca.pem.as_bytes(), None))).await;
    assert!(wrong_trust.is_err(), "a client trusting another CA connected");

    // An agent without a client certificate: UNAUTHENTICATED.
    let no_cert = connect(&url, Some(client_tls(server_ca.pem.as_bytes(), None))).await.unwrap();
    assert_eq!(session(no_cert).await.unwrap_err().code(), Code::Unauthenticated);

    // An agent with a certificate from the agent CA: Welcome.
    let (acert, akey) = agent_ca.leaf("agent-1", &["agent-1"]);
    let good = client_tls(server_ca.pem.as_bytes(), Some((acert.as_bytes(), akey.as_bytes())));
    let ch = connect(&url, Some(good)).await.unwrap();
    assert!(matches!(session(ch).await.unwrap(), In::Welcome(_)));

    // An agent with a certificate from another CA fails the handshake.
    let (rcert, rkey) = rogue_ca.leaf("intruder", &["intruder"]);
    let rogue = client_tls(server_ca.pem.as_bytes(), Some((rcert.as_bytes(), rkey.as_bytes())));
    let refused = match connect(&url, Some(rogue)).await {
        Err(_) => true,
        Ok(ch) => session(ch).await.is_err(),
    };
    assert!(refused, "a certificate from another CA opened a session");

    // A valid agent certificate grants nothing on ScanService.
    let (acert, akey) = agent_ca.leaf("agent-2", &["agent-2"]);
    let ch = connect(&url, Some(client_tls(server_ca.pem.as_bytes(), Some((acert.as_bytes(), akey.as_bytes())))))
        .await
        .unwrap();
    let mut as_agent = portfleet_proto::auth::client(ch, Bearer::new("").unwrap());
    let err = as_agent.list_scans(pb::ListScansRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}
