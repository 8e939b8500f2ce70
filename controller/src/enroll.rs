//! Agent identity (docs/security.md): the controller's agent CA, one-time
//! enrollment tokens, signing an agent's certificate request, and reading
//! an agent's identity back from the certificate it presents.
//!
//! An agent's identity is its certificate's common name: the agent id the
//! controller assigned when it signed. The key never leaves the agent.

use std::{path::Path, time::Duration};

use chrono::{DateTime, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
};
use uuid::Uuid;

use crate::{
    auth::{self, AuthError},
    store::{Labels, Store, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("{0}")]
    Ca(String),
    #[error("the enrollment token is unknown, used or expired")]
    BadToken,
    #[error("bad certificate request: {0}")]
    BadRequest(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<AuthError> for EnrollError {
    fn from(_: AuthError) -> Self {
        EnrollError::BadToken
    }
}

fn ca_err(what: &str) -> impl Fn(rcgen::Error) -> EnrollError + '_ {
    move |e| EnrollError::Ca(format!("{what}: {e}"))
}

/// Writes `contents` readable by the owner only.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(path)?;
    f.write_all(contents)
}

/// `ca init`: a new CA, and a server certificate for `server_names` signed
/// by it, written to `dir` (keys 0600). Returns the paths written.
pub fn init_ca(dir: &Path, server_names: &[String]) -> Result<Vec<std::path::PathBuf>, EnrollError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| EnrollError::Ca(format!("{}: {e}", p.display()))
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let ca_key = KeyPair::generate().map_err(ca_err("CA key"))?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(ca_err("CA"))?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, "portfleet agent CA");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(3650);
    let ca_cert = params.self_signed(&ca_key).map_err(ca_err("CA certificate"))?;
    let issuer = Issuer::new(params, ca_key);

    let server_key = KeyPair::generate().map_err(ca_err("server key"))?;
    let mut sp = CertificateParams::new(server_names.to_vec()).map_err(ca_err("server names"))?;
    sp.distinguished_name.push(DnType::CommonName, server_names.first().map_or("portfleet-controller", |s| s));
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    sp.not_before = now - time::Duration::hours(1);
    sp.not_after = now + time::Duration::days(365);
    let server_cert = sp.signed_by(&server_key, &issuer).map_err(ca_err("server certificate"))?;

    let files = [
        ("ca.pem", ca_cert.pem(), false),
        ("ca.key", issuer.key().serialize_pem(), true),
        ("server.pem", server_cert.pem(), false),
        ("server.key", server_key.serialize_pem(), true),
    ];
    let mut written = Vec::new();
    for (name, pem, private) in files {
        let p = dir.join(name);
        if p.exists() {
            return Err(EnrollError::Ca(format!("{} exists; not overwriting it", p.display())));
        }
        if private { write_private(&p, pem.as_bytes()) } else { std::fs::write(&p, pem) }.map_err(io(&p))?;
        written.push(p);
    }
    Ok(written)
}

/// The CA that signs agents' certificates.
pub struct AgentCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    /// Lifetime of an agent certificate.
    pub cert_ttl: Duration,
}

impl std::fmt::Debug for AgentCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCa").field("cert_ttl", &self.cert_ttl).finish_non_exhaustive()
    }
}

impl AgentCa {
    pub fn load(cert: &Path, key: &Path, cert_ttl: Duration) -> Result<Self, EnrollError> {
        let read = |p: &Path| std::fs::read_to_string(p).map_err(|e| EnrollError::Ca(format!("{}: {e}", p.display())));
        let pem = read(cert)?;
        let key = KeyPair::from_pem(&read(key)?).map_err(ca_err("CA key"))?;
        let issuer = Issuer::from_ca_cert_pem(&pem, key).map_err(ca_err("CA certificate"))?;
        Ok(Self { issuer, pem, cert_ttl })
    }

    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Signs `csr_pem` for `agent_id`: whatever the request asked, the
    /// certificate names the agent id, is a client certificate only, and
    /// lives `cert_ttl`.
    pub fn sign(&self, csr_pem: &str, agent_id: Uuid) -> Result<(String, DateTime<Utc>), EnrollError> {
        if csr_pem.len() > 16 * 1024 {
            return Err(EnrollError::BadRequest("larger than 16 KiB".into()));
        }
        let mut csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| EnrollError::BadRequest(e.to_string()))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, agent_id.to_string());
        let p = &mut csr.params;
        p.distinguished_name = dn;
        p.subject_alt_names = Vec::new();
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.custom_extensions = Vec::new();
        // Unique even when an agent sends the same key twice.
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let now = time::OffsetDateTime::now_utc();
        let ttl = time::Duration::seconds(self.cert_ttl.as_secs().min(crate::config::MAX_TTL.as_secs()) as i64);
        // Backdated for clock skew, by little enough that the agent's
        // "renew with a third left" stays meaningful for short lifetimes.
        p.not_before = now - std::cmp::min(ttl / 10_i32, time::Duration::minutes(5));
        p.not_after = now
            .checked_add(ttl)
            .ok_or_else(|| EnrollError::Ca(format!("a certificate lifetime of {ttl} is too long")))?;
        let expires = DateTime::<Utc>::from_timestamp(p.not_after.unix_timestamp(), 0).unwrap_or_else(Utc::now);
        let cert = csr.signed_by(&self.issuer).map_err(|e| EnrollError::BadRequest(e.to_string()))?;
        Ok((cert.pem(), expires))
    }
}

/// `agents enroll-token`: a one-time token (`pfe_<id>_<secret>`).
pub async fn create_enroll_token(store: &Store, labels: &Labels, ttl: Duration) -> Result<String, StoreError> {
    let (id, secret, hash) = auth::new_secret();
    let expires = auth::expiry(ttl)?;
    store.insert_enroll_token(id, &hash, labels, expires).await?;
    Ok(format!("pfe_{}_{secret}", id.simple()))
}

/// Uses a token once, for `agent_id`; returns the token's labels.
pub async fn redeem(store: &Store, token: &str, agent_id: Uuid) -> Result<Labels, EnrollError> {
    let (id, secret) = auth::parse_secret("pfe_", token.trim())?;
    store.redeem_enroll_token(id, &auth::hash_secret(&secret), agent_id).await?.ok_or(EnrollError::BadToken)
}

/// The agent id a client certificate (DER) names, if it names one.
pub fn agent_of(cert_der: &[u8]) -> Option<Uuid> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?;
    Uuid::try_parse(cn).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signs_requests_for_the_assigned_identity_only() {
        let dir = tempfile::tempdir().unwrap();
        init_ca(dir.path(), &["127.0.0.1".into()]).unwrap();
        assert!(init_ca(dir.path(), &["127.0.0.1".into()]).is_err(), "never overwrites");
        let ca =
            AgentCa::load(&dir.path().join("ca.pem"), &dir.path().join("ca.key"), Duration::from_secs(3600)).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "I am the admin");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let id = Uuid::new_v4();
        let (pem, expires) = ca.sign(&csr, id).unwrap();
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap().1.contents;
        assert_eq!(agent_of(&der), Some(id), "the certificate names the assigned id, not what was asked");
        assert!(
            expires > Utc::now() + chrono::Duration::minutes(59)
                && expires < Utc::now() + chrono::Duration::minutes(61)
        );
        assert!(ca.sign("not a csr", id).is_err());
        let mode = std::fs::metadata(dir.path().join("ca.key")).unwrap().permissions();
        assert_eq!(std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777, 0o600);
    }
}
