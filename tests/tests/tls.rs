//! TLS and mTLS with real handshakes, certificates made here with rcgen:
//! operators' clients reach ScanService over TLS with a token; plaintext
//! and clients trusting another CA fail; agents need a client certificate
//! from the controller's client CA, and one from another CA fails the
//! handshake.

use std::path::{Path, PathBuf};

use portfleet_controller::{config::TlsFiles, enroll};
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

fn hello(id: uuid::Uuid) -> pb::AgentMessage {
    pb::AgentMessage {
        frame: Some(Out::Hello(pb::Hello {
            agent_id: id.to_string(),
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

/// Opens an agent session claiming `id`; returns the first frame's outcome.
async fn session(channel: Channel, id: uuid::Uuid) -> Result<In, tonic::Status> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(id)).await.unwrap();
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
        client_ca_key: None,
        agent_cert_ttl: std::time::Duration::from_secs(3600),
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
    assert_eq!(session(no_cert, uuid::Uuid::new_v4()).await.unwrap_err().code(), Code::Unauthenticated);

    // An agent with a certificate from the agent CA: Welcome, if its Hello
    // claims the identity the certificate names.
    let id = uuid::Uuid::new_v4();
    let (acert, akey) = agent_ca.leaf(&id.to_string(), &[]);
    let good = client_tls(server_ca.pem.as_bytes(), Some((acert.as_bytes(), akey.as_bytes())));
    let ch = connect(&url, Some(good.clone())).await.unwrap();
    assert!(matches!(session(ch, id).await.unwrap(), In::Welcome(_)));
    let ch = connect(&url, Some(good)).await.unwrap();
    let err = session(ch, uuid::Uuid::new_v4()).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "a Hello claiming another identity: {err:?}");
    // A certificate that names no agent id.
    let (ncert, nkey) = agent_ca.leaf("not-an-id", &[]);
    let ch = connect(&url, Some(client_tls(server_ca.pem.as_bytes(), Some((ncert.as_bytes(), nkey.as_bytes())))))
        .await
        .unwrap();
    assert_eq!(session(ch, id).await.unwrap_err().code(), Code::Unauthenticated);

    // An agent with a certificate from another CA fails the handshake.
    let (rcert, rkey) = rogue_ca.leaf("intruder", &["intruder"]);
    let rogue = client_tls(server_ca.pem.as_bytes(), Some((rcert.as_bytes(), rkey.as_bytes())));
    let refused = match connect(&url, Some(rogue)).await {
        Err(_) => true,
        Ok(ch) => session(ch, uuid::Uuid::new_v4()).await.is_err(),
    };
    assert!(refused, "a certificate from another CA opened a session");

    // A valid agent certificate grants nothing on ScanService.
    let (acert, akey) = agent_ca.leaf(&uuid::Uuid::new_v4().to_string(), &[]);
    let ch = connect(&url, Some(client_tls(server_ca.pem.as_bytes(), Some((acert.as_bytes(), akey.as_bytes())))))
        .await
        .unwrap();
    let mut as_agent = portfleet_proto::auth::client(ch, Bearer::new("").unwrap());
    let err = as_agent.list_scans(pb::ListScansRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
}

/// A controller serving TLS from `ca init` files and enrolling agents,
/// with certificates of `cert_ttl_s` seconds.
struct Enrolling {
    dir: tempfile::TempDir,
    tls_dir: PathBuf,
    ca_pem: Vec<u8>,
    db: TestDb,
    c: TestController,
    store: portfleet_controller::store::Store,
}

impl Enrolling {
    async fn start(cert_ttl_s: u64) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        enroll::init_ca(&tls_dir, &["127.0.0.1".into(), "localhost".into()]).unwrap();
        let db = TestDb::create().await;
        let mut config = controller_config(db.options());
        config.tls = Some(TlsFiles {
            cert: tls_dir.join("server.pem"),
            key: tls_dir.join("server.key"),
            client_ca: Some(tls_dir.join("ca.pem")),
            client_ca_key: Some(tls_dir.join("ca.key")),
            agent_cert_ttl: std::time::Duration::from_secs(cert_ttl_s),
        });
        let ca_pem = std::fs::read(tls_dir.join("ca.pem")).unwrap();
        let c = TestController::start_tls(config, &ca_pem).await;
        let store = db.store().await;
        Self { dir, tls_dir, ca_pem, db, c, store }
    }
}

/// Enrollment end to end with the real `portfleet-agent enroll`: the key is
/// made on the agent, a token works once and expires, the certificate
/// names the assigned id, and revoking the agent ends its live session and
/// refuses it after.
// Multi-threaded: the agent binary is awaited with a blocking call while
// the in-process controller must answer it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enroll_once_then_revoke() {
    use std::os::unix::fs::PermissionsExt;

    let Enrolling { dir, tls_dir, ca_pem, db: _db, c, store } = Enrolling::start(3600).await;
    let labels = [("site".to_string(), "lab".to_string())].into_iter().collect();
    let token = enroll::create_enroll_token(&store, &labels, std::time::Duration::from_secs(3600)).await.unwrap();
    let state = dir.path().join("state");
    let enroll_with = |token: &str| {
        std::process::Command::new(portfleet_tests::binary("portfleet-agent"))
            .args(["enroll", "--controller", &c.url(), "--token", token, "--name", "e1", "--ca"])
            .arg(tls_dir.join("ca.pem"))
            .arg("--state-dir")
            .arg(&state)
            .env_remove("PORTFLEET_CONTROLLER")
            .output()
            .unwrap()
    };
    let out = enroll_with(&token);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for ext in ["key", "crt", "id", "ca.pem", "labels"] {
        let meta = std::fs::metadata(state.join(format!("agent-e1.{ext}"))).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{ext}");
    }
    assert!(std::fs::read_to_string(state.join("agent-e1.labels")).unwrap().contains("site=lab"));
    let id: uuid::Uuid = std::fs::read_to_string(state.join("agent-e1.id")).unwrap().trim().parse().unwrap();
    // Used once: a second use is refused.
    let again = enroll_with(&token);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("PermissionDenied"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    // Expired.
    let brief = enroll::create_enroll_token(&store, &labels, std::time::Duration::from_secs(1)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    assert!(!enroll_with(&brief).status.success(), "an expired token enrolled");

    // The enrolled identity opens a session.
    let cert = std::fs::read(state.join("agent-e1.crt")).unwrap();
    let key = std::fs::read(state.join("agent-e1.key")).unwrap();
    let tls = client_tls(&ca_pem, Some((&cert, &key)));
    let ch = connect(&c.url(), Some(tls.clone())).await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(hello(id)).await.unwrap();
    let mut inbound = AgentServiceClient::new(ch).session(ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(matches!(inbound.message().await.unwrap().and_then(|m| m.frame), Some(In::Welcome(_))));
    // Revoked: the live session ends within seconds, reconnecting fails.
    store.revoke_agent(id).await.unwrap();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        loop {
            match inbound.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the revoked session ended within 5 s");
    assert!(ended.is_err() || matches!(ended, Ok(None)));
    drop(tx);
    let ch = connect(&c.url(), Some(tls)).await.unwrap();
    assert_eq!(session(ch, id).await.unwrap_err().code(), Code::PermissionDenied);
    store.close().await;
}

/// A short-lived enrolled certificate is renewed by the running agent over
/// mTLS before it expires; the renewed files are 0600 and open a session
/// as the same agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_agent_renews_its_certificate() {
    use std::os::unix::fs::PermissionsExt;

    let Enrolling { dir, tls_dir, ca_pem, db: _db, c, store } = Enrolling::start(12).await;
    let token =
        enroll::create_enroll_token(&store, &Default::default(), std::time::Duration::from_secs(60)).await.unwrap();
    let state = dir.path().join("state");
    let agent = |cmd: &str| {
        let mut c2 = std::process::Command::new(portfleet_tests::binary("portfleet-agent"));
        c2.args([cmd, "--controller", &c.url(), "--name", "r1", "--state-dir"])
            .arg(&state)
            .env_remove("PORTFLEET_CONTROLLER");
        c2
    };
    let out = agent("enroll").args(["--token", &token, "--ca"]).arg(tls_dir.join("ca.pem")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let first = std::fs::read(state.join("agent-r1.crt")).unwrap();
    // Nothing is ever assigned (no scans); the allow-list keeps it that way.
    let mut run =
        agent("run").args(["--allow", "198.51.100.0/30"]).stderr(std::process::Stdio::null()).spawn().unwrap();
    let renewed = portfleet_tests::eventually("the certificate renewed", std::time::Duration::from_secs(30), || {
        let first = first.clone();
        let path = state.join("agent-r1.crt");
        async move { std::fs::read(&path).ok().filter(|c| *c != first) }
    })
    .await;
    let _ = run.kill();
    let _ = run.wait();
    let key = std::fs::read(state.join("agent-r1.key")).unwrap();
    for f in ["agent-r1.crt", "agent-r1.key"] {
        assert_eq!(std::fs::metadata(state.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
    }
    let id: uuid::Uuid = std::fs::read_to_string(state.join("agent-r1.id")).unwrap().trim().parse().unwrap();
    let ch = connect(&c.url(), Some(client_tls(&ca_pem, Some((&renewed, &key))))).await.unwrap();
    assert!(matches!(session(ch, id).await.unwrap(), In::Welcome(_)), "the renewed identity is the same agent");
    store.close().await;
}
