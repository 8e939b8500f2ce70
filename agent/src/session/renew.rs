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

fn staged_key(key_path: &Path) -> std::path::PathBuf {
    key_path.with_extension("key.next")
}

/// The public key (DER) of a certificate, and of a key, to match them.
fn cert_public_key(cert_pem: &[u8]) -> Option<Vec<u8>> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem).ok()?;
    let cert = pem.parse_x509().ok()?;
    Some(cert.public_key().subject_public_key.data.to_vec())
}

/// Finishes a renewal a crash interrupted: a staged key that matches the
/// certificate becomes the key; one that does not is stale and removed.
pub fn recover(cert_path: &Path, key_path: &Path) {
    let staged = staged_key(key_path);
    let Ok(next) = std::fs::read_to_string(&staged) else { return };
    let matches = std::fs::read(cert_path).ok().and_then(|c| cert_public_key(&c)).is_some_and(|public| {
        KeyPair::from_pem(&next).is_ok_and(|k| rcgen::PublicKeyData::der_bytes(&k) == public.as_slice())
    });
    let done = if matches { std::fs::rename(&staged, key_path) } else { std::fs::remove_file(&staged) };
    match done {
        Ok(()) if matches => tracing::warn!("finished a certificate renewal a crash interrupted"),
        Ok(()) => {}
        Err(e) => tracing::warn!(error = %e, "cannot clean up {}", staged.display()),
    }
}

async fn renew_once(endpoint: &Endpoint, tls: &Mutex<Option<ClientTls>>) -> Result<(), String> {
    let current = tls.lock().unwrap_or_else(|p| p.into_inner()).clone().ok_or("no TLS identity")?;
    let (cert_path, key_path) = current.renew.clone().ok_or("no enrolled identity")?;
    let new_key = KeyPair::generate().map_err(|e| e.to_string())?;
    let csr = CertificateParams::new(Vec::<String>::new())
        .and_then(|p| p.serialize_request(&new_key))
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
    let key = new_key.serialize_pem().into_bytes();
    // Never store a pair that cannot work together.
    if cert_public_key(&cert).as_deref() != Some(rcgen::PublicKeyData::der_bytes(&new_key)) {
        return Err("the controller's certificate is not for the key this agent sent".into());
    }
    // The new key is staged next to the old one before the certificate is
    // replaced; a crash between the two renames leaves the staged key,
    // which `recover` promotes at the next start when it matches.
    let key_tmp = staged_key(&key_path);
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
        let pause = match renew_once(&endpoint, &tls).await {
            Ok(()) => {
                tracing::info!("certificate renewed");
                // Even if clocks disagree so much that the new certificate
                // looks due at once, never renew in a tight loop.
                Duration::from_secs((lifetime / 10).clamp(1, 3600) as u64)
            }
            Err(e) => {
                let left = (not_after - now()).max(0);
                tracing::warn!(error = %e, expires_in_s = left, "certificate renewal failed; retrying");
                // Expired: renewal cannot succeed any more (re-enroll); try rarely.
                Duration::from_secs(if left == 0 { 300 } else { (left / 10).clamp(1, 300) as u64 })
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recover_promotes_only_a_staged_key_that_matches_the_certificate() {
        let dir = tempfile::tempdir().unwrap();
        let (cert_path, key_path) = (dir.path().join("a.crt"), dir.path().join("a.key"));
        let new_key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(Vec::<String>::new()).unwrap().self_signed(&new_key).unwrap();
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, "old key").unwrap();
        // Crashed after the certificate was replaced: the staged key matches.
        std::fs::write(staged_key(&key_path), new_key.serialize_pem()).unwrap();
        recover(&cert_path, &key_path);
        assert_eq!(std::fs::read_to_string(&key_path).unwrap(), new_key.serialize_pem());
        assert!(!staged_key(&key_path).exists());
        // Crashed before: the staged key does not match and is dropped.
        std::fs::write(staged_key(&key_path), KeyPair::generate().unwrap().serialize_pem()).unwrap();
        recover(&cert_path, &key_path);
        assert_eq!(std::fs::read_to_string(&key_path).unwrap(), new_key.serialize_pem());
        assert!(!staged_key(&key_path).exists());
    }
}
