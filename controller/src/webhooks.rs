//! Webhook delivery: POSTs each recorded event to the webhooks that asked
//! for it, at least once. Deliveries are leased from Postgres (so several
//! controllers share them and a crash mid-attempt only delays one), each
//! attempt is bounded by a deadline, failures retry with backoff, and a
//! delivery that failed every attempt is kept in the log as failed.
//!
//! Each request carries `X-Portfleet-Signature: sha256=<hex>`, the
//! HMAC-SHA256 of the body under the webhook's secret, and
//! `X-Portfleet-Delivery`, an id a receiver can deduplicate on.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use hmac::{Hmac, Mac};
use http_body_util::Full;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use portfleet_core::backoff::Backoff;
use sha2::Sha256;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::store::{Attempt, DeliveryState, DueDelivery, ScanRecord, Store, StoreError};

/// Deliveries attempted at once by one controller.
const BATCH: i64 = 16;
/// Longest one attempt may take (connect, TLS, request, response head).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a leased delivery is another controller's to leave alone.
const LEASE: Duration = Duration::from_secs(60);
/// Attempts before a delivery is given up as failed (about 2 h of retries).
pub const MAX_ATTEMPTS: i32 = 10;
const RETRY_FIRST: Duration = Duration::from_secs(5);
const RETRY_MAX: Duration = Duration::from_secs(30 * 60);
/// How often the deliverer looks for due deliveries.
const POLL: Duration = Duration::from_secs(1);

/// Why an attempt failed before the receiver answered.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("invalid URL: {0}")]
    Url(String),
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Is `url` one a webhook may have: http(s) with a host.
pub fn check_url(url: &str) -> Result<Uri, String> {
    let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("must start with http:// or https://".into()),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err("has no host".into());
    }
    Ok(uri)
}

/// The signature header's value for `body`.
pub fn sign(secret: &str, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// Runs until `cancel`.
pub async fn run(store: Store, cancel: CancellationToken) {
    let tls = tls_connector();
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        let wait = match deliver_due(&store, &tls).await {
            // More due at once; still stoppable between batches.
            Ok(n) if n as i64 == BATCH && !cancel.is_cancelled() => continue,
            Ok(_) => {
                backoff.reset();
                POLL
            }
            Err(e) => {
                let retry_in = backoff.next_delay();
                tracing::warn!(error = %e, ?retry_in, "cannot read webhook deliveries; retrying");
                retry_in
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

async fn deliver_due(store: &Store, tls: &tokio_rustls::TlsConnector) -> Result<usize, StoreError> {
    let due = store.lease_deliveries(BATCH, LEASE).await?;
    if due.is_empty() {
        return Ok(0);
    }
    let ids: Vec<uuid::Uuid> = due.iter().map(|d| d.scan_id).collect();
    let scans = store.scans_any(&ids).await?;
    // Each outcome is recorded as it comes: a receiver that hangs holds
    // back nobody's log but its own (and the next lease, by at most the
    // attempt deadline).
    let mut attempts: futures::stream::FuturesUnordered<_> = due
        .iter()
        .map(|d| {
            let scan = scans.iter().find(|s| s.id == d.scan_id);
            attempt(d, scan, tls)
        })
        .collect();
    while let Some(a) = futures::StreamExt::next(&mut attempts).await {
        store.record_attempts(std::slice::from_ref(&a)).await?;
    }
    Ok(due.len())
}

/// The body of a delivery: what the events exchange carries.
fn body(d: &DueDelivery, scan: Option<&ScanRecord>) -> Vec<u8> {
    let payload = d.payload.as_ref().map(|p| &p.0);
    let value = match scan {
        Some(s) => crate::ingress::event_body_with(&d.event, s, payload),
        // Deleted since: what is known.
        None => {
            let mut v = serde_json::json!({ "event": d.event, "scan_id": d.scan_id.to_string() });
            if let (Some(serde_json::Value::Object(extra)), Some(map)) = (payload, v.as_object_mut()) {
                map.extend(extra.clone());
            }
            v
        }
    };
    serde_json::to_vec(&value).unwrap_or_default()
}

async fn attempt(d: &DueDelivery, scan: Option<&ScanRecord>, tls: &tokio_rustls::TlsConnector) -> Attempt {
    let body = body(d, scan);
    let outcome = tokio::time::timeout(ATTEMPT_TIMEOUT, post(d, body, tls))
        .await
        .unwrap_or(Err(DeliveryError::Timeout(ATTEMPT_TIMEOUT)));
    let (status, error) = match outcome {
        Ok(s) if (200..300).contains(&s) => (s, None),
        Ok(s) => (s, Some(format!("the receiver answered {s}"))),
        Err(e) => (0, Some(e.to_string())),
    };
    let state = match &error {
        None => DeliveryState::Delivered,
        Some(_) if d.attempts >= MAX_ATTEMPTS => DeliveryState::Failed,
        Some(_) => DeliveryState::Pending,
    };
    if let Some(e) = &error {
        tracing::warn!(delivery = d.id, url = %d.url, attempt = d.attempts, error = %e, "webhook delivery failed");
    }
    let retry_in = Backoff::nth_delay(RETRY_FIRST, RETRY_MAX, d.attempts.max(1) as u32);
    Attempt { id: d.id, state, status, error, retry_in }
}

async fn post(d: &DueDelivery, body: Vec<u8>, tls: &tokio_rustls::TlsConnector) -> Result<u16, DeliveryError> {
    let uri = check_url(&d.url).map_err(DeliveryError::Url)?;
    let https = uri.scheme_str() == Some("https");
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let authority = uri.authority().map(ToString::to_string).unwrap_or_default();
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let request = Request::post(path)
        .header("host", authority)
        .header("content-type", "application/json")
        .header("user-agent", concat!("portfleet/", env!("CARGO_PKG_VERSION")))
        .header("x-portfleet-event", &d.event)
        .header("x-portfleet-delivery", d.id.to_string())
        .header("x-portfleet-signature", sign(&d.secret, &body))
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| DeliveryError::Url(e.to_string()))?;
    let tcp = TcpStream::connect((host.as_str(), port)).await.map_err(DeliveryError::Connect)?;
    let _ = tcp.set_nodelay(true);
    if https {
        let name = rustls::pki_types::ServerName::try_from(host).map_err(|e| DeliveryError::Url(e.to_string()))?;
        let stream = tls.connect(name, tcp).await.map_err(DeliveryError::Tls)?;
        send(TokioIo::new(stream), request).await
    } else {
        send(TokioIo::new(tcp), request).await
    }
}

async fn send<S>(io: S, request: Request<Full<Bytes>>) -> Result<u16, DeliveryError>
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    // The connection is driven here, beside the request, not in a task of
    // its own: it ends with the attempt.
    let mut conn = std::pin::pin!(conn);
    let mut response = std::pin::pin!(sender.send_request(request));
    tokio::select! {
        response = &mut response => Ok(response?.status().as_u16()),
        done = &mut conn => {
            // A server that answers and closes (HTTP/1.0) ends the
            // connection first; the answer is then ready, or an error.
            done?;
            Ok(response.await?.status().as_u16())
        }
    }
}

fn tls_connector() -> tokio_rustls::TlsConnector {
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map(|b| b.with_root_certificates(roots).with_no_client_auth())
        .unwrap_or_else(|_| {
            rustls::ClientConfig::builder().with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth()
        });
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_http_with_a_host() {
        assert!(check_url("https://hooks.example.com/x?y=1").is_ok());
        assert!(check_url("http://127.0.0.1:8080/").is_ok());
        for bad in ["ftp://x/", "file:///etc/passwd", "hooks.example.com", "http://", ""] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_signature_is_rfc_4231_hmac_sha256() {
        // RFC 4231 test case 2.
        assert_eq!(
            sign("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
