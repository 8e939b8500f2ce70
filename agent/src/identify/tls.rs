//! TLS for identification: one client handshake that accepts any server
//! certificate and records what the server showed ([`Tls`]).
//!
//! We record, never trust: the certificate chain is not checked against any
//! root, name or date. The handshake itself is real: the server's signature
//! over the handshake is verified with the certificate's key, using the
//! ring provider's algorithms, so a peer that merely replays a certificate
//! does not complete it. Unlike webpki, the key is read with `x509-parser`,
//! so the X.509 v1 certificates of old appliances still handshake.
//!
//! Session resumption is off: every handshake shows the certificate afresh.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use portfleet_core::service::{MAX_FIELD, MAX_LIST, Tls, truncate};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{ClientConnection, Resumption};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, InvalidMessage, ProtocolVersion, SignatureScheme};
use sha2::{Digest, Sha256};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The application protocols a handshake offers (ALPN).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// `h2` then `http/1.1`: what a browser offers, so the server's choice
    /// is recorded.
    Web,
    /// `http/1.1` only: for the HTTP/1.1 request the agent sends inside.
    Http1,
    /// None: what nmap's probes offer, and the retry for a server that
    /// refuses a handshake whose protocols it does not speak.
    None,
}

impl Alpn {
    fn protocols(self) -> &'static [&'static [u8]] {
        match self {
            Alpn::Web => &[b"h2", b"http/1.1"],
            Alpn::Http1 => &[b"http/1.1"],
            Alpn::None => &[],
        }
    }
}

/// Why a handshake gave no [`Tls`].
#[derive(Debug, thiserror::Error)]
pub enum TlsFailure {
    /// The peer answered with bytes that are not a TLS record: something
    /// else listens on the port (the driver may go on with plain probes).
    #[error("not tls: {0}")]
    NotTls(String),
    /// The peer refused every application protocol offered (its
    /// `no_application_protocol` alert): it may accept a handshake that
    /// offers none.
    #[error("the peer speaks none of the application protocols offered")]
    NoSharedAlpn,
    /// The peer spoke TLS (or closed) but no session came of it: an alert,
    /// no shared version or cipher, a malformed message, a close.
    #[error("tls handshake failed: {0}")]
    Handshake(String),
    #[error("tls handshake timed out after {0:?}")]
    Timeout(Duration),
}

static CONFIGS: LazyLock<[Arc<ClientConfig>; 3]> =
    LazyLock::new(|| [Alpn::Web, Alpn::Http1, Alpn::None].map(|alpn| Arc::new(build_config(alpn))));

/// The identification client config: TLS 1.3 and 1.2 with the ring
/// provider (not the process default), `alpn`'s protocols, any
/// certificate accepted, no resumption. Built once per [`Alpn`].
pub fn client_config(alpn: Alpn) -> Arc<ClientConfig> {
    Arc::clone(&CONFIGS[alpn as usize])
}

fn build_config(alpn: Alpn) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = Arc::new(RecordAnyCertificate { algorithms: provider.signature_verification_algorithms });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        // The ring provider has suites and groups for both versions; a test
        // builds this config.
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = alpn.protocols().iter().map(|p| p.to_vec()).collect();
    config.resumption = Resumption::disabled();
    config
}

/// A TLS client handshake over `tcp`, bounded by `deadline`.
///
/// `sni` is the host name to send as SNI; None, an empty string, an IP
/// address or a string that is no DNS name sends no SNI (rustls sends none
/// for a `ServerName::IpAddress`).
pub async fn handshake(
    tcp: TcpStream,
    sni: Option<&str>,
    deadline: Duration,
    alpn: Alpn,
) -> Result<(TlsStream<TcpStream>, Tls), TlsFailure> {
    let dns_name = sni.map(str::trim).and_then(|name| match ServerName::try_from(name.to_string()) {
        Ok(ServerName::DnsName(dns)) => Some(ServerName::DnsName(dns)),
        _ => None,
    });
    let sent_sni = match &dns_name {
        Some(ServerName::DnsName(dns)) => dns.as_ref().to_string(),
        _ => String::new(),
    };
    let server_name = dns_name.unwrap_or_else(|| {
        let ip = tcp.peer_addr().map(|a| a.ip()).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        ServerName::IpAddress(ip.into())
    });

    let connector = TlsConnector::from(client_config(alpn));
    let stream = match tokio::time::timeout(deadline, connector.connect(server_name, tcp)).await {
        Err(_elapsed) => return Err(TlsFailure::Timeout(deadline)),
        Ok(Err(e)) => return Err(failure(e)),
        Ok(Ok(stream)) => stream,
    };
    let mut tls = describe(stream.get_ref().1);
    tls.sni = sent_sni;
    truncate(&mut tls.sni, MAX_FIELD);
    Ok((stream, tls))
}

/// Sorts an I/O error from the handshake into a [`TlsFailure`].
fn failure(e: std::io::Error) -> TlsFailure {
    if let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        return match tls {
            rustls::Error::InvalidMessage(
                InvalidMessage::InvalidContentType
                | InvalidMessage::UnknownProtocolVersion
                | InvalidMessage::MessageTooLarge,
            ) => TlsFailure::NotTls(format!("the peer sent bytes that are no tls record ({tls})")),
            rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol) => TlsFailure::NoSharedAlpn,
            other => TlsFailure::Handshake(other.to_string()),
        };
    }
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        return TlsFailure::Handshake("the peer closed the connection during the handshake".into());
    }
    TlsFailure::Handshake(e.to_string())
}

/// What the finished handshake on `conn` showed; `sni` is left empty.
fn describe(conn: &ClientConnection) -> Tls {
    let mut tls = Tls {
        version: match conn.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => "TLSv1.3".into(),
            Some(ProtocolVersion::TLSv1_2) => "TLSv1.2".into(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        },
        cipher: conn
            .negotiated_cipher_suite()
            .map(|s| s.suite())
            .map(|s| s.as_str().map_or_else(|| format!("{s:?}"), str::to_string))
            .unwrap_or_default(),
        alpn: conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default(),
        ..Tls::default()
    };
    if let Some(leaf) = conn.peer_certificates().and_then(|certs| certs.first()) {
        describe_certificate(leaf, &mut tls);
    }
    for s in [&mut tls.version, &mut tls.cipher, &mut tls.alpn] {
        truncate(s, MAX_FIELD);
    }
    tls
}

/// Fills the certificate fields of `tls` from the leaf certificate. A
/// certificate x509-parser cannot read still gets its fingerprint.
fn describe_certificate(der: &CertificateDer<'_>, tls: &mut Tls) {
    tls.sha256 = Sha256::digest(der.as_ref()).iter().map(|b| format!("{b:02x}")).collect();
    let Ok((_, cert)) = X509Certificate::from_der(der.as_ref()) else { return };

    tls.subject_cn = cert.subject().iter_common_name().find_map(|cn| cn.as_str().ok()).unwrap_or_default().to_string();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            let text = match *name {
                GeneralName::DNSName(dns) => dns.to_string(),
                GeneralName::IPAddress(&[a, b, c, d]) => IpAddr::from([a, b, c, d]).to_string(),
                GeneralName::IPAddress(bytes) => match <[u8; 16]>::try_from(bytes) {
                    Ok(v6) => IpAddr::from(v6).to_string(),
                    Err(_) => continue,
                },
                _ => continue,
            };
            if tls.sans.len() < MAX_LIST {
                tls.sans.push(text);
            }
        }
    }
    tls.issuer = cert.issuer().to_string();
    tls.not_before = cert.validity().not_before.timestamp();
    tls.not_after = cert.validity().not_after.timestamp();
    tls.self_signed = cert.subject().as_raw() == cert.issuer().as_raw() && cert.verify_signature(None).is_ok();

    for s in [&mut tls.subject_cn, &mut tls.issuer] {
        truncate(s, MAX_FIELD);
    }
    tls.sans.iter_mut().for_each(|s| truncate(s, MAX_FIELD));
}

/// The signature schemes TLS 1.3 allows in CertificateVerify (RFC 8446
/// 4.2.3): no PKCS#1 v1.5, no SHA-1.
const TLS13_SCHEMES: [SignatureScheme; 8] = [
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ECDSA_NISTP521_SHA512,
    SignatureScheme::RSA_PSS_SHA256,
    SignatureScheme::RSA_PSS_SHA384,
    SignatureScheme::RSA_PSS_SHA512,
    SignatureScheme::ED25519,
    SignatureScheme::ED448,
];

/// Accepts every certificate, verifies every handshake signature.
#[derive(Debug)]
struct RecordAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl RecordAnyCertificate {
    /// Verifies `dss` over `message` with the key of `cert`, trying the
    /// algorithms the scheme maps to (TLS 1.3: only the first).
    fn verify(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
        first_only: bool,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let bad_signature = || rustls::Error::InvalidCertificate(rustls::CertificateError::BadSignature);
        let (_, parsed) = X509Certificate::from_der(cert.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        let spki = parsed.public_key();
        let key_algorithm =
            der_sequence_contents(spki.raw).and_then(der_sequence_contents).ok_or_else(bad_signature)?;
        let candidates = self
            .algorithms
            .mapping
            .iter()
            .find(|(scheme, _)| *scheme == dss.scheme)
            .map(|(_, algorithms)| *algorithms)
            .ok_or(rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme)?;
        let candidates = if first_only { &candidates[..candidates.len().min(1)] } else { candidates };
        let verified = candidates
            .iter()
            .filter(|alg| alg.public_key_alg_id().as_ref() == key_algorithm)
            .any(|alg| alg.verify_signature(&spki.subject_public_key.data, message, dss.signature()).is_ok());
        if verified { Ok(HandshakeSignatureValid::assertion()) } else { Err(bad_signature()) }
    }
}

impl ServerCertVerifier for RecordAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verify(message, cert, dss, false)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !TLS13_SCHEMES.contains(&dss.scheme) {
            return Err(rustls::PeerMisbehaved::SignedHandshakeWithUnadvertisedSigScheme.into());
        }
        self.verify(message, cert, dss, true)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// The contents of the DER SEQUENCE at the start of `der`: for a
/// SubjectPublicKeyInfo, its AlgorithmIdentifier and key; applied twice, the
/// AlgorithmIdentifier's contents, which is what webpki algorithms name.
fn der_sequence_contents(der: &[u8]) -> Option<&[u8]> {
    let [0x30, first, rest @ ..] = der else { return None };
    let (len, rest) = match *first {
        short @ 0..=0x7f => (usize::from(short), rest),
        long @ 0x81..=0x84 => {
            let n = usize::from(long & 0x7f);
            let bytes = rest.get(..n)?;
            (bytes.iter().fold(0usize, |len, &b| (len << 8) | usize::from(b)), &rest[n..])
        }
        _ => return None,
    };
    rest.get(..len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};
    use rustls::ServerConfig;
    use rustls::pki_types::PrivateKeyDer;
    use rustls::pki_types::pem::PemObject;
    use std::time::Instant;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    struct Made {
        der: CertificateDer<'static>,
        key: PrivateKeyDer<'static>,
    }

    fn self_signed(cn: &str, sans: Vec<SanType>) -> Made {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.subject_alt_names = sans;
        params.not_before = rcgen::date_time_ymd(2024, 1, 2);
        params.not_after = rcgen::date_time_ymd(2034, 1, 2);
        let cert = params.self_signed(&key).unwrap();
        Made { der: cert.der().clone(), key: PrivateKeyDer::try_from(key.serialize_der()).unwrap() }
    }

    fn server_config(made: &Made, versions: &[&'static rustls::SupportedProtocolVersion]) -> Arc<ServerConfig> {
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![made.der.clone()], made.key.clone_key())
            .unwrap();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Arc::new(config)
    }

    /// Serves one TLS connection on 127.0.0.1 and answers "pong" to "ping".
    async fn tls_server(config: Arc<ServerConfig>) -> (TcpStream, tokio::task::JoinHandle<Option<String>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await.ok()?;
            let sni = tls.get_ref().1.server_name().map(str::to_string);
            let mut ping = [0u8; 4];
            tls.read_exact(&mut ping).await.ok()?;
            tls.write_all(b"pong").await.ok()?;
            tls.shutdown().await.ok()?;
            Some(sni.unwrap_or_default())
        });
        (TcpStream::connect(addr).await.unwrap(), server)
    }

    #[tokio::test]
    async fn a_handshake_records_every_field_of_the_certificate() {
        let made = self_signed(
            "portfleet.test",
            vec![
                SanType::DnsName("portfleet.test".try_into().unwrap()),
                SanType::DnsName("*.portfleet.test".try_into().unwrap()),
                SanType::IpAddress("127.0.0.1".parse().unwrap()),
                SanType::IpAddress("::1".parse().unwrap()),
            ],
        );
        let (tcp, server) = tls_server(server_config(&made, &[&rustls::version::TLS13])).await;
        let (mut stream, tls) =
            handshake(tcp, Some("portfleet.test"), Duration::from_secs(5), Alpn::Web).await.unwrap();

        let expected_sha256: String = Sha256::digest(made.der.as_ref()).iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            tls,
            Tls {
                version: "TLSv1.3".into(),
                cipher: tls.cipher.clone(),
                alpn: "http/1.1".into(),
                sni: "portfleet.test".into(),
                subject_cn: "portfleet.test".into(),
                sans: vec!["portfleet.test".into(), "*.portfleet.test".into(), "127.0.0.1".into(), "::1".into()],
                issuer: "CN=portfleet.test".into(),
                not_before: rcgen::date_time_ymd(2024, 1, 2).unix_timestamp(),
                not_after: rcgen::date_time_ymd(2034, 1, 2).unix_timestamp(),
                self_signed: true,
                sha256: expected_sha256,
            }
        );
        assert!(tls.cipher.starts_with("TLS13_"), "{}", tls.cipher);

        // The stream is usable after the handshake.
        stream.write_all(b"ping").await.unwrap();
        let mut pong = Vec::new();
        stream.read_to_end(&mut pong).await.unwrap();
        assert_eq!(pong, b"pong");
        assert_eq!(server.await.unwrap().as_deref(), Some("portfleet.test"));
    }

    #[tokio::test]
    async fn tls12_and_an_ip_send_no_sni() {
        let made = self_signed("router.local", vec![]);
        let (tcp, server) = tls_server(server_config(&made, &[&rustls::version::TLS12])).await;
        let (mut stream, tls) = handshake(tcp, Some("127.0.0.1"), Duration::from_secs(5), Alpn::Web).await.unwrap();
        assert_eq!(tls.version, "TLSv1.2");
        assert!(tls.cipher.starts_with("TLS_ECDHE_"), "{}", tls.cipher);
        assert_eq!(tls.sni, "");
        assert_eq!(tls.subject_cn, "router.local");
        assert!(tls.sans.is_empty());
        stream.write_all(b"ping").await.unwrap();
        let mut pong = Vec::new();
        stream.read_to_end(&mut pong).await.unwrap();
        // The server saw no SNI at all.
        assert_eq!(server.await.unwrap().as_deref(), Some(""));
    }

    #[tokio::test]
    async fn a_certificate_signed_by_another_key_is_not_self_signed() {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::default();
        ca_params.distinguished_name.push(DnType::CommonName, "Portfleet Test CA");
        ca_params.distinguished_name.push(DnType::OrganizationName, "Portfleet");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::new(vec!["leaf.test".to_string()]).unwrap();
        leaf_params.distinguished_name.push(DnType::CommonName, "leaf.test");
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let made = Made { der: leaf.der().clone(), key: PrivateKeyDer::try_from(leaf_key.serialize_der()).unwrap() };
        drop(ca);

        let (tcp, _server) = tls_server(server_config(&made, &[&rustls::version::TLS13])).await;
        let (_stream, tls) = handshake(tcp, None, Duration::from_secs(5), Alpn::Web).await.unwrap();
        assert_eq!(tls.subject_cn, "leaf.test");
        assert_eq!(tls.issuer, "CN=Portfleet Test CA, O=Portfleet");
        assert!(!tls.self_signed);
        assert_eq!(tls.sans, vec!["leaf.test".to_string()]);
    }

    /// An X.509 v1 certificate (no extensions), as old appliances still
    /// serve, and its P-256 key: made with `openssl x509 -req -signkey`.
    const V1_CERT: &str = "-----BEGIN CERTIFICATE-----
MIIBTTCB9AIBBzAKBggqhkjOPQQDAjAyMRcwFQYDVQQDDA5hcHBsaWFuY2UudGVz
dDEXMBUGA1UECgwOT2xkIEFwcGxpYW5jZXMwIBcNMjYxMjAzMDgwNjEyWhgPMjEy
NjExMDkwODA2MTJaMDIxFzAVBgNVBAMMDmFwcGxpYW5jZS50ZXN0MRcwFQYDVQQK
DA5PbGQgQXBwbGlhbmNlczBZMBMGByqGSM49AgEGCCqGSM49AwEHA0IABP7EGSTE
MKZFJMGg7/Xb2wQykaKabE++qr6V0mzxxC6APg5TbYL2sAJePA5daZFI3uoCNh4Z
Kp2vL7bGudoekawwCgYIKoZIzj0EAwIDSAAwRQIgEOuvMPYJkuISDmWhnf5rn+u3
fpODc1m1LyDI2c8shHgCIQC7alBWJ+ebWA3r8M+76JZ21TFrBNgsLK3X1YxsdmuQ
Mw==
-----END CERTIFICATE-----
";
    const V1_KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgbz+41qWZS5JLkTFX
FKmSLxG6JdHAIYB7tXgAwwFMPpihRANCAAT+xBkkxDCmRSTBoO/129sEMpGimmxP
vqq+ldJs8cQugD4OU22C9rACXjwOXWmRSN7qAjYeGSqdry+2xrnaHpGs
-----END PRIVATE KEY-----
";

    #[tokio::test]
    async fn an_x509_v1_certificate_still_handshakes() {
        let cert = CertificateDer::from_pem_slice(V1_CERT.as_bytes()).unwrap();
        let key = PrivateKeyDer::from_pem_slice(V1_KEY.as_bytes()).unwrap();
        // rustls's own check of a certificate against its key reads it with
        // webpki, which refuses v1: serve it through a resolver.
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = provider.key_provider.load_private_key(key).unwrap();
        let certified = Arc::new(rustls::sign::CertifiedKey::new(vec![cert], key));
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let config = ServerConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Serve(Arc::clone(&certified))));
            let (tcp, _server) = tls_server(Arc::new(config)).await;
            let (_stream, tls) = handshake(tcp, None, Duration::from_secs(5), Alpn::Web).await.unwrap();
            assert_eq!(tls.subject_cn, "appliance.test");
            assert_eq!(tls.issuer, "CN=appliance.test, O=Old Appliances");
            assert!(tls.self_signed);
            assert_eq!(tls.not_after - tls.not_before, 36_500 * 86_400);
        }
    }

    /// Serves one certificate and key, unchecked.
    #[derive(Debug)]
    struct Serve(Arc<rustls::sign::CertifiedKey>);

    impl rustls::server::ResolvesServerCert for Serve {
        fn resolve(&self, _: rustls::server::ClientHello<'_>) -> Option<Arc<rustls::sign::CertifiedKey>> {
            Some(Arc::clone(&self.0))
        }
    }

    /// A server that shows a certificate but signs the handshake with
    /// another key (as one without the certificate's key would have to).
    #[tokio::test]
    async fn a_handshake_signed_by_another_key_fails() {
        let shown = self_signed("victim.test", vec![]);
        let signer = self_signed("impostor.test", vec![]);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = provider.key_provider.load_private_key(signer.key.clone_key()).unwrap();
        let certified = Arc::new(rustls::sign::CertifiedKey::new(vec![shown.der.clone()], key));
        for version in [&rustls::version::TLS12, &rustls::version::TLS13] {
            let config = ServerConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(Serve(Arc::clone(&certified))));
            let (tcp, _server) = tls_server(Arc::new(config)).await;
            let err = handshake(tcp, None, Duration::from_secs(5), Alpn::Web).await.unwrap_err();
            assert!(matches!(&err, TlsFailure::Handshake(reason) if reason.contains("BadSignature")), "{err}");
        }
    }

    /// A listener on 127.0.0.1 whose one connection gets `reply` and is then
    /// held open (`hold_open`) or closed.
    async fn raw_server(reply: &'static [u8], hold_open: Duration) -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut hello = [0u8; 512];
            let _ = tcp.read(&mut hello).await;
            let _ = tcp.write_all(reply).await;
            tokio::time::sleep(hold_open).await;
        });
        TcpStream::connect(addr).await.unwrap()
    }

    #[tokio::test]
    async fn a_plain_text_server_is_not_tls() {
        let tcp = raw_server(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", Duration::from_secs(30)).await;
        let started = Instant::now();
        let err = handshake(tcp, None, Duration::from_secs(5), Alpn::Web).await.unwrap_err();
        assert!(matches!(err, TlsFailure::NotTls(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn garbage_that_looks_like_a_record_fails_the_handshake() {
        // A handshake record holding junk, then the connection held open.
        let tcp = raw_server(b"\x16\x03\x03\x00\x05\xff\xff\xff\xff\xff", Duration::from_secs(30)).await;
        let err = handshake(tcp, None, Duration::from_secs(5), Alpn::Web).await.unwrap_err();
        assert!(matches!(err, TlsFailure::Handshake(_)), "{err}");
    }

    #[tokio::test]
    async fn a_close_mid_handshake_fails_the_handshake() {
        // Half a ServerHello header, then a close.
        let tcp = raw_server(b"\x16\x03\x03\x00\x4a\x02\x00", Duration::ZERO).await;
        let err = handshake(tcp, None, Duration::from_secs(5), Alpn::Web).await.unwrap_err();
        assert!(matches!(err, TlsFailure::Handshake(_)), "{err}");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_at_the_deadline() {
        let tcp = raw_server(b"", Duration::from_secs(30)).await;
        let started = Instant::now();
        let err = handshake(tcp, Some("silent.test"), Duration::from_millis(300), Alpn::Web).await.unwrap_err();
        assert!(matches!(err, TlsFailure::Timeout(_)), "{err}");
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(300) && took < Duration::from_secs(2), "{took:?}");
    }

    /// A server that speaks only its own protocol refuses a handshake
    /// offering HTTP's; the same handshake offering none goes through.
    #[tokio::test]
    async fn a_server_of_another_protocol_refuses_http_alpn_but_not_none() {
        let made = self_signed("broker.test", vec![]);
        let mut config = ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![made.der.clone()], made.key.clone_key())
            .unwrap();
        config.alpn_protocols = vec![b"mqtt".to_vec()];
        let config = Arc::new(config);
        let (tcp, _server) = tls_server(config.clone()).await;
        let err = handshake(tcp, None, Duration::from_secs(5), Alpn::Web).await.unwrap_err();
        assert!(matches!(err, TlsFailure::NoSharedAlpn), "{err}");
        let (tcp, _server) = tls_server(config).await;
        let (_stream, tls) = handshake(tcp, None, Duration::from_secs(5), Alpn::None).await.unwrap();
        assert_eq!((tls.subject_cn.as_str(), tls.alpn.as_str()), ("broker.test", ""));
    }

    #[test]
    fn the_config_offers_h2_and_http11_and_builds_from_ring() {
        let config = client_config(Alpn::Web);
        assert_eq!(config.alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
        assert_eq!(client_config(Alpn::Http1).alpn_protocols, vec![b"http/1.1".to_vec()]);
        assert!(client_config(Alpn::None).alpn_protocols.is_empty());
        assert!(config.crypto_provider().cipher_suites.iter().any(|s| s.version() == &rustls::version::TLS12));
        assert!(config.crypto_provider().cipher_suites.iter().any(|s| s.version() == &rustls::version::TLS13));
    }

    #[test]
    fn der_sequences_with_long_lengths_are_read() {
        assert_eq!(der_sequence_contents(&[0x30, 0x02, 1, 2, 3]), Some(&[1u8, 2][..]));
        let long = [&[0x30u8, 0x81, 0x80][..], &[7u8; 0x80]].concat();
        assert_eq!(der_sequence_contents(&long).map(<[u8]>::len), Some(0x80));
        assert_eq!(der_sequence_contents(&[0x30, 0x05, 1]), None);
        assert_eq!(der_sequence_contents(&[0x04, 0x00]), None);
        assert_eq!(der_sequence_contents(&[0x30, 0x80]), None);
    }
}
