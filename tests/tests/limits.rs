//! Connection and input limits, from the wire: silent connections are
//! closed (plaintext and after a TLS handshake), connections over the
//! per-address and total caps are refused at accept while the others keep
//! working, long calls keep their connection alive past the idle timeout;
//! health follows a private Postgres that the test stops and starts; an
//! undecodable message is INVALID_ARGUMENT.

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use portfleet_controller::{ControllerConfig, config::TlsFiles, enroll};
use portfleet_proto::{
    auth::Bearer,
    codec::ProtoCodec,
    v1::{self as pb, agent_message::Frame as Out, agent_service_client::AgentServiceClient},
};
use portfleet_tests::{TestController, TestDb, controller_config, eventually, pgcluster::PgCluster, procs};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// Reads until the peer closes (EOF or an error: true) or `within` passes
/// with the connection still open (false). Data the server sends first
/// (its HTTP/2 SETTINGS) is read and ignored.
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

/// A TCP connection to `to` from the loopback address `from`.
async fn connect_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    socket.connect(to).await.unwrap()
}

/// A connection from `from` that the controller keeps: retried while
/// connections of the harness (closed, but not yet noticed by the server)
/// still count against a limit.
async fn admitted_from(from: [u8; 4], to: SocketAddr) -> TcpStream {
    eventually("a connection the controller keeps", Duration::from_secs(5), || async move {
        let mut s = connect_from(from, to).await;
        (!closed_within(&mut s, Duration::from_millis(300)).await).then_some(s)
    })
    .await
}

async fn serving(channel: Channel, service: &str) -> i32 {
    let request = HealthCheckRequest { service: service.to_string() };
    match HealthClient::new(channel).check(request).await {
        Ok(r) => r.into_inner().status,
        Err(status) => panic!("health check of {service:?} failed: {status}"),
    }
}

fn small_timeouts(config: &mut ControllerConfig, handshake: Duration, idle: Duration) {
    config.connections.handshake_timeout = handshake;
    config.connections.idle_timeout = idle;
}

/// The real binary, plaintext, `--handshake-timeout 500ms`: a connection
/// that sends nothing is closed, and one that sends only the HTTP/2 preface
/// too.
#[tokio::test]
async fn a_silent_plaintext_connection_is_closed() {
    let db = TestDb::create().await;
    let logs = tempfile::tempdir().unwrap();
    let port = procs::free_port([127, 0, 0, 1].into());
    let listen = format!("127.0.0.1:{port}");
    let _controller = procs::controller(
        "controller",
        db.url(),
        &listen,
        &["--handshake-timeout", "500ms", "--idle-timeout", "1s"],
        &logs,
    );
    let url = format!("http://{listen}");
    eventually("the controller serving", Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            let channel = Channel::from_shared(url).ok()?.connect().await.ok()?;
            (serving(channel, "").await == 1).then_some(())
        }
    })
    .await;
    let addr: SocketAddr = listen.parse().unwrap();

    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(3)).await, "a silent connection stayed open for 3 s");
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(400), "closed before the handshake timeout: {took:?}");

    // The HTTP/2 preface and SETTINGS, then nothing: no call, closed too.
    let mut preface_only = TcpStream::connect(addr).await.unwrap();
    preface_only.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
    assert!(
        closed_within(&mut preface_only, Duration::from_secs(3)).await,
        "a connection that opened no call stayed open for 3 s"
    );
}

/// TLS, `handshake_timeout = 500ms`: a connection that never sends its
/// ClientHello is closed, and so is one that completes the handshake and
/// then sends nothing.
#[tokio::test]
async fn a_silent_tls_connection_is_closed_after_the_handshake() {
    use std::io::Read;

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
        client_ca_key: None,
        agent_cert_ttl: Duration::from_secs(3600),
    });
    small_timeouts(&mut config, Duration::from_millis(500), Duration::from_secs(1));
    let ca_pem = std::fs::read(tls_dir.join("ca.pem")).unwrap();
    let c = TestController::start_tls(config, &ca_pem).await;
    let addr = c.addr;

    // A TLS handshake that never starts (or stalls) is bounded as well.
    let mut stalled = TcpStream::connect(addr).await.unwrap();
    assert!(closed_within(&mut stalled, Duration::from_secs(3)).await, "a stalled TLS handshake stayed open for 3 s");

    // rustls on a plain blocking socket: the handshake and nothing else.
    let outcome = tokio::task::spawn_blocking(move || {
        use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            roots.add(cert.unwrap()).unwrap();
        }
        let mut tls = rustls::ClientConfig::builder().with_root_certificates(roots).with_no_client_auth();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let mut conn =
            rustls::ClientConnection::new(Arc::new(tls), ServerName::try_from("localhost").unwrap()).unwrap();
        let mut sock = std::net::TcpStream::connect(addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        while conn.is_handshaking() {
            conn.complete_io(&mut sock).expect("the TLS handshake");
        }
        let handshaken = Instant::now();
        let mut stream = rustls::Stream::new(&mut conn, &mut sock);
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf) {
                Ok(0) => return Some(handshaken.elapsed()),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    return None;
                }
                Err(_) => return Some(handshaken.elapsed()),
            }
        }
    })
    .await
    .unwrap();
    let after = outcome.expect("a TLS connection that sent nothing after the handshake stayed open for 4 s");
    assert!(after < Duration::from_secs(3), "closed only after {after:?}");
}

/// `max_connections_per_ip = 3`: a fourth connection from 127.0.0.1 is
/// closed at once while health checks on an existing one keep working, and
/// a slot frees when a connection closes.
#[tokio::test]
async fn connections_over_the_per_address_cap_are_refused_at_accept() {
    let db = TestDb::create().await;
    let mut config = controller_config(db.options());
    config.connections.max_connections_per_ip = 3;
    let c = TestController::start(config).await;
    let health = c.channel().await;
    assert_eq!(serving(health.clone(), "").await, 1);
    let one = admitted_from([127, 0, 0, 1], c.addr).await;
    let _two = admitted_from([127, 0, 0, 1], c.addr).await;

    let started = Instant::now();
    let mut extra = connect_from([127, 0, 0, 1], c.addr).await;
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await, "a fourth connection from one address was kept");
    assert!(started.elapsed() < Duration::from_secs(1), "refused only after {:?}", started.elapsed());
    // The existing connection is unaffected; another address is not limited.
    assert_eq!(serving(health.clone(), "").await, 1);
    let _other = admitted_from([127, 0, 0, 2], c.addr).await;

    drop(one);
    let _again = admitted_from([127, 0, 0, 1], c.addr).await;
    assert_eq!(serving(health, "").await, 1);
}

/// `max_connections = 3`: the fourth connection is refused whatever its
/// address.
#[tokio::test]
async fn connections_over_the_total_cap_are_refused_at_accept() {
    let db = TestDb::create().await;
    let mut config = controller_config(db.options());
    config.connections.max_connections = 3;
    let c = TestController::start(config).await;
    let health = c.channel().await;
    assert_eq!(serving(health.clone(), "").await, 1);
    let _a = admitted_from([127, 0, 0, 2], c.addr).await;
    let _b = admitted_from([127, 0, 0, 3], c.addr).await;
    let mut extra = connect_from([127, 0, 0, 4], c.addr).await;
    assert!(closed_within(&mut extra, Duration::from_secs(2)).await, "a connection over the total cap was kept");
    assert_eq!(serving(health, "").await, 1);
}

/// Forwards the first connection to `upstream` and reports when the
/// upstream side (the controller) closes it.
async fn forward_one(upstream: SocketAddr) -> (SocketAddr, tokio::sync::oneshot::Receiver<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((client, _)) = listener.accept().await else { return };
        drop(listener);
        let Ok(server) = TcpStream::connect(upstream).await else { return };
        let (mut client_rx, mut client_tx) = client.into_split();
        let (mut server_rx, mut server_tx) = server.into_split();
        tokio::spawn(async move {
            let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
        });
        let _ = tokio::io::copy(&mut server_rx, &mut client_tx).await;
        let _ = closed_tx.send(());
        let _ = client_tx.shutdown().await;
    });
    (addr, closed_rx)
}

/// Idle timeout 1 s: a connection carrying a WatchScan and an agent
/// session stays open for three times that; once both end, the controller
/// closes it within about a second.
#[tokio::test]
async fn long_calls_keep_their_connection_and_an_idle_one_is_closed() {
    let db = TestDb::create().await;
    let mut config = controller_config(db.options());
    small_timeouts(&mut config, Duration::from_secs(1), Duration::from_secs(1));
    let c = TestController::start(config).await;
    let mut api = c.client().await;
    // Four probes of TEST-NET-2; no agent takes it, so it stays pending.
    let scan = api
        .create_scan(pb::CreateScanRequest {
            targets: vec!["198.51.100.0/30".into()],
            ports: "80".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let (via, mut server_closed) = forward_one(c.addr).await;
    let channel = Channel::from_shared(format!("http://{via}")).unwrap().connect().await.unwrap();
    let mut watcher = portfleet_proto::auth::client(channel.clone(), Bearer::new(&c.token).unwrap());
    let mut watch = watcher.watch_scan(pb::WatchScanRequest { id: scan.id.clone() }).await.unwrap().into_inner();
    assert!(watch.message().await.unwrap().is_some(), "the snapshot");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let hello = pb::Hello {
        agent_id: uuid::Uuid::new_v4().to_string(),
        name: "idle-test".into(),
        version: "test".into(),
        min_protocol_version: 1,
        max_protocol_version: 1,
        capabilities: Some(pb::Capabilities { raw_socket: false, ipv6: false }),
        max_shards: 0,
        ..Default::default()
    };
    tx.send(pb::AgentMessage { frame: Some(Out::Hello(hello)) }).await.unwrap();
    let mut session =
        AgentServiceClient::new(channel.clone()).session(ReceiverStream::new(rx)).await.unwrap().into_inner();
    assert!(session.message().await.unwrap().is_some(), "Welcome");

    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        tx.send(pb::AgentMessage { frame: Some(Out::Heartbeat(pb::Heartbeat::default())) }).await.unwrap();
        assert!(server_closed.try_recv().is_err(), "the controller closed a connection with open calls");
    }
    match tokio::time::timeout(Duration::from_millis(100), watch.message()).await {
        Err(_) | Ok(Ok(Some(_))) => {}
        Ok(other) => panic!("the watch ended: {other:?}"),
    }

    drop((tx, session, watch, watcher));
    let ended = Instant::now();
    tokio::time::timeout(Duration::from_secs(4), &mut server_closed)
        .await
        .expect("the controller closed the idle connection within 4 s")
        .expect("the forwarder reported");
    let after = ended.elapsed();
    assert!(after >= Duration::from_millis(800), "closed {after:?} after its calls ended: before the idle timeout");
}

/// A private cluster stopped as in a crash: the server-wide status and
/// both services go NOT_SERVING within about 2 s, and SERVING within about
/// 2 s of the database's return.
#[tokio::test]
async fn health_follows_the_database_for_every_service() {
    const NAMES: [&str; 3] = ["", "portfleet.v1.ScanService", "portfleet.v1.AgentService"];
    let pg = PgCluster::start().await;
    let c = TestController::start(controller_config(pg.options())).await;
    let channel = c.channel().await;
    let all = |want: i32| {
        let channel = channel.clone();
        move || {
            let channel = channel.clone();
            async move {
                for name in NAMES {
                    if serving(channel.clone(), name).await != want {
                        return None;
                    }
                }
                Some(())
            }
        }
    };
    eventually("every status SERVING", Duration::from_secs(5), all(1)).await;

    let stopping = Instant::now();
    pg.stop().await;
    eventually("every status NOT_SERVING", Duration::from_millis(2500), all(2)).await;
    let down = stopping.elapsed();

    let starting = Instant::now();
    pg.start_again().await;
    let started = starting.elapsed();
    let back = Instant::now();
    eventually("every status SERVING again", Duration::from_millis(2500), all(1)).await;
    let up = back.elapsed();
    eprintln!("NOT_SERVING {down:?} after the stop began; SERVING {up:?} after the restart ({started:?} to start)");
    assert!(down <= Duration::from_millis(2500) && up <= Duration::from_millis(2500));
}

/// A raw call whose body is `bytes` as field 1 (length-delimited), which is
/// the first field of both GetScanRequest (`id`) and CreateScanRequest
/// (`targets`): prost's `Vec<u8>` message is `google.protobuf.BytesValue`.
async fn raw_call(channel: Channel, token: &str, method: &str, bytes: Vec<u8>) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(bytes);
    request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let path =
        tonic::codegen::http::uri::PathAndQuery::try_from(format!("/portfleet.v1.ScanService/{method}")).unwrap();
    match grpc.unary::<Vec<u8>, (), _>(request, path, ProtoCodec::default()).await {
        Ok(_) => panic!("{method}: an undecodable request was accepted"),
        Err(status) => status,
    }
}

#[tokio::test]
async fn undecodable_messages_are_invalid_argument() {
    let db = TestDb::create().await;
    let c = TestController::start(controller_config(db.options())).await;
    let not_utf8 = vec![0xff, 0xfe, b'1', b'0'];
    for method in ["GetScan", "CreateScan"] {
        let status = raw_call(c.channel().await, &c.token, method, not_utf8.clone()).await;
        assert_eq!(status.code(), Code::InvalidArgument, "{method}: {status:?}");
        assert!(status.message().contains("UTF-8"), "{method}: the message says why: {status:?}");
    }
    // Valid UTF-8 in the same place decodes: the handler answers.
    let status = raw_call(c.channel().await, &c.token, "GetScan", b"not-a-uuid".to_vec()).await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(!status.message().contains("UTF-8"), "{status:?}");
}
