//! Renews an enrolled agent's certificate over mTLS before it expires: a
//! new key made here, a certificate request, `AgentService.Renew`, and the
//! files replaced atomically. The next connection uses the new identity;
//! a live session keeps the one it was made with.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use portfleet_proto::v1::{self as pb, agent_service_client::AgentServiceClient};
use rcgen::{CertificateParams, KeyPair};
use tokio_util::sync::CancellationToken;
use tonic::transport::Endpoint;

use super::ClientTls;

/// Renew once this fraction of the lifetime is left.
const RENEW_AT_REMAINING: f64 = 1.0 / 3.0;

/// The certificate's validity, as UNIX seconds.
fn validity(cert_pem: &[u8]) -> Option<(i64, i64)> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some((cert.validity().not_before.timestamp(), cert.validity().not_after.timestamp()))
}

fn now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
}

/// Writes `contents` next to `path`, 0600, then renames it over `path`:
/// a crash leaves the old file or the new one, never half of one.
fn replace(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

async fn renew_once(endpoint: &Endpoint, tls: &Mutex<Option<ClientTls>>) -> Result<(), String> {
    let current = tls.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or("no TLS identity")?;
    let (cert_path, key_path) = current.renew.clone().ok_or("no enrolled identity")?;
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&key))
        .and_then(|c| c.pem())
        .map_err(|e| e.to_string())?;
    let channel = endpoint.clone().tls_config(current.config()).map_err(|e| e.to_string())?.connect().await;
    let channel = channel.map_err(|e| format!("cannot reach the controller: {e}"))?;
    let r = AgentServiceClient::new(channel)
        .renew(pb::RenewRequest { csr_pem: csr })
        .await
        .map_err(|s| format!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let cert = r.certificate_pem.into_bytes();
    let key = key.serialize_pem().into_bytes();
    validity(&cert).ok_or("the controller sent an unreadable certificate")?;
    // Key first: a crash between the two leaves a key the old certificate
    // does not match, which the next renewal cannot fix - so keep the old
    // key until the certificate is in place.
    let key_tmp = key_path.with_extension("next");
    replace(&key_tmp, &key).map_err(|e| format!("{}: {e}", key_tmp.display()))?;
    replace(&cert_path, &cert).map_err(|e| format!("{}: {e}", cert_path.display()))?;
    std::fs::rename(&key_tmp, &key_path).map_err(|e| format!("{}: {e}", key_path.display()))?;
    if let Some(t) = tls.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        t.identity = Some((cert, key));
    }
    Ok(())
}

/// Sleeps until the certificate is due, renews, and repeats until cancelled.
pub async fn run(endpoint: Endpoint, tls: Arc<Mutex<Option<ClientTls>>>, cancel: CancellationToken) {
    loop {
        let cert = tls.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|t| t.identity.clone());
        let Some((not_before, not_after)) = cert.and_then(|(c, _)| validity(&c)) else {
            tracing::warn!("cannot read this agent's certificate; it will not be renewed");
            return;
        };
        let lifetime = (not_after - not_before).max(1);
        let due = not_after - (lifetime as f64 * RENEW_AT_REMAINING) as i64;
        let wait = Duration::from_secs((due - now()).clamp(0, 3600) as u64);
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        if now() < due {
            continue;
        }
        match renew_once(&endpoint, &tls).await {
            Ok(()) => tracing::info!("certificate renewed"),
            Err(e) => {
                let left = (not_after - now()).max(0);
                tracing::warn!(error = %e, expires_in_s = left, "certificate renewal failed; retrying");
                let retry = Duration::from_secs((left / 10).clamp(1, 300) as u64);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(retry) => {}
                }
            }
        }
    }
}
