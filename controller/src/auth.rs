//! API tokens and their scopes (docs/security.md).
//!
//! A token is `pft_<id>_<secret>`: the id (a UUID, 32 hex digits) names
//! the row, the secret (32 random bytes, 64 hex digits) is checked against
//! the SHA-256 stored for it. Tokens have high entropy, so one hash without
//! salt or stretching is enough, and it keeps a check cheap. Lookups are
//! cached for a few seconds; a revocation takes effect within that time.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::{Status, metadata::MetadataMap};
use uuid::Uuid;

use crate::store::{Store, StoreError, TokenRecord};

/// What a token may do. Ordered: each scope includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Scope {
    /// Get, List, Watch.
    Read,
    /// CreateScan, CancelScan, targets.
    Scan,
    /// Agents, tokens, policy.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Scan => "scan",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "read" => Some(Scope::Read),
            "scan" => Some(Scope::Scan),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token (send `authorization: Bearer <token>`)")]
    Missing,
    #[error("malformed token")]
    Malformed,
    #[error("unknown, revoked or expired token")]
    Invalid,
    #[error("token {id} has scope {has}; this call needs {needs}")]
    Scope { id: Uuid, has: &'static str, needs: &'static str },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A freshly made token: the only time its secret exists in clear.
pub struct NewToken {
    pub record: TokenRecord,
    pub token: String,
}

fn digest(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Compares in constant time, so timing says nothing about where two
/// hashes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Splits `pft_<id>_<secret>`.
fn parse_token(token: &str) -> Result<(Uuid, Vec<u8>), AuthError> {
    parse_secret("pft_", token)
}

/// Splits `<prefix><id>_<secret>` (API and enrollment tokens).
pub(crate) fn parse_secret(prefix: &str, token: &str) -> Result<(Uuid, Vec<u8>), AuthError> {
    let rest = token.strip_prefix(prefix).ok_or(AuthError::Malformed)?;
    let (id, secret) = rest.split_once('_').ok_or(AuthError::Malformed)?;
    let id = Uuid::try_parse(id).map_err(|_| AuthError::Malformed)?;
    if secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(AuthError::Malformed);
    }
    Ok((id, secret.as_bytes().to_vec()))
}

/// A new id, secret (64 hex digits) and the secret's hash.
pub(crate) fn new_secret() -> (Uuid, String, [u8; 32]) {
    let mut raw = [0u8; 32];
    rand::rng().fill_bytes(&mut raw);
    let secret: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let hash = digest(secret.as_bytes());
    (Uuid::new_v4(), secret, hash)
}

pub(crate) fn hash_secret(secret: &[u8]) -> [u8; 32] {
    digest(secret)
}

/// Now plus `ttl`, refusing lifetimes the calendar cannot hold.
pub(crate) fn expiry(ttl: Duration) -> Result<DateTime<Utc>, StoreError> {
    chrono::Duration::from_std(ttl)
        .ok()
        .and_then(|t| Utc::now().checked_add_signed(t))
        .ok_or_else(|| StoreError::Invalid(format!("a lifetime of {} is too long", humantime::format_duration(ttl))))
}

/// Creates a token (shown once; only its hash is stored).
pub async fn create_token(
    store: &Store,
    name: &str,
    scope: Scope,
    ttl: Option<Duration>,
) -> Result<NewToken, StoreError> {
    let (id, secret, hash) = new_secret();
    let expires_at = ttl.map(expiry).transpose()?;
    let record = store.insert_token(id, name, scope.as_str(), &hash, expires_at).await?;
    Ok(NewToken { record, token: format!("pft_{}_{secret}", id.simple()) })
}

#[derive(Clone)]
struct Cached {
    hash: Vec<u8>,
    scope: Option<Scope>,
    expires_at: Option<DateTime<Utc>>,
    revoked: bool,
    fetched: Instant,
}

/// Who made a call.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub token_id: Uuid,
    pub scope: Scope,
}

/// Checks bearer tokens against the store, with a short cache.
#[derive(Clone)]
pub struct Authorizer {
    store: Store,
    ttl: Duration,
    cache: Arc<Mutex<HashMap<Uuid, Cached>>>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer").field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

/// Most cached tokens; past it the cache starts over (memory stays flat
/// however many bogus ids are tried).
const CACHE_MAX: usize = 10_000;

impl Authorizer {
    pub fn new(store: Store, ttl: Duration) -> Self {
        Self { store, ttl, cache: Default::default() }
    }

    async fn lookup(&self, id: Uuid) -> Result<Cached, AuthError> {
        if let Some(c) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(&id)
            && c.fetched.elapsed() < self.ttl
        {
            return Ok(c.clone());
        }
        let row = self.store.get_token(id).await?;
        let cached = match row {
            Some(r) => Cached {
                hash: r.secret_hash,
                scope: Scope::parse(&r.scope),
                expires_at: r.expires_at,
                revoked: r.revoked_at.is_some(),
                fetched: Instant::now(),
            },
            // Unknown ids are cached too, so guessing costs no queries.
            None => Cached { hash: Vec::new(), scope: None, expires_at: None, revoked: true, fetched: Instant::now() },
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(id, cached.clone());
        Ok(cached)
    }

    /// The caller, if the request's token is valid and has `needs`.
    pub async fn check(&self, metadata: &MetadataMap, needs: Scope) -> Result<Caller, AuthError> {
        let value = metadata.get("authorization").ok_or(AuthError::Missing)?;
        let value = value.to_str().map_err(|_| AuthError::Malformed)?;
        let token =
            value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer ")).ok_or(AuthError::Malformed)?.trim();
        let (id, secret) = parse_token(token)?;
        let c = self.lookup(id).await?;
        let live = !c.revoked && c.expires_at.is_none_or(|t| t > Utc::now());
        let scope = match c.scope {
            Some(s) if live && same(&c.hash, &digest(&secret)) => s,
            _ => return Err(AuthError::Invalid),
        };
        if scope < needs {
            return Err(AuthError::Scope { id, has: scope.as_str(), needs: needs.as_str() });
        }
        Ok(Caller { token_id: id, scope })
    }

    /// [`Self::check`] as a gRPC status, logged with the token id (never the
    /// secret).
    pub async fn authorize(&self, metadata: &MetadataMap, needs: Scope, rpc: &'static str) -> Result<Caller, Status> {
        match self.check(metadata, needs).await {
            Ok(c) => Ok(c),
            Err(AuthError::Store(e)) => Err(crate::api::store_status(e)),
            Err(e @ AuthError::Scope { id, .. }) => {
                tracing::warn!(rpc, token_id = %id, "permission denied: {e}");
                Err(Status::permission_denied(e.to_string()))
            }
            Err(e) => {
                let token_id = claimed_id(metadata);
                tracing::warn!(rpc, token_id = token_id.as_deref().unwrap_or("-"), "unauthenticated: {e}");
                Err(Status::unauthenticated(e.to_string()))
            }
        }
    }
}

/// The token id a request claims, for logs (the id is not secret).
fn claimed_id(metadata: &MetadataMap) -> Option<String> {
    let v = metadata.get("authorization")?.to_str().ok()?;
    let rest = v.split_whitespace().nth(1)?.strip_prefix("pft_")?;
    let id = rest.split('_').next()?;
    Uuid::try_parse(id).ok().map(|u| u.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_ordered() {
        assert!(Scope::Admin > Scope::Scan && Scope::Scan > Scope::Read);
        for s in [Scope::Read, Scope::Scan, Scope::Admin] {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        assert_eq!(Scope::parse("root"), None);
    }

    #[test]
    fn parses_only_well_formed_tokens() {
        let id = Uuid::new_v4();
        let secret = "ab".repeat(32);
        let (got, s) = parse_token(&format!("pft_{}_{secret}", id.simple())).unwrap();
        assert_eq!(got, id);
        assert_eq!(s, secret.as_bytes());
        for bad in [
            "",
            "pft_",
            "pft_x_y",
            &format!("pft_{}_{}", id.simple(), "ab".repeat(31)),
            &format!("pft_{}_{}", id.simple(), "zz".repeat(32)),
            &format!("xyz_{}_{secret}", id.simple()),
        ] {
            assert!(parse_token(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn compares_whole_hashes() {
        assert!(same(&[1, 2, 3], &[1, 2, 3]));
        assert!(!same(&[1, 2, 3], &[1, 2, 4]));
        assert!(!same(&[1, 2], &[1, 2, 3]));
    }
}
