//! The controller's scope policy: the operator's rules from Postgres, the
//! built-in deny-list and this host's own addresses, combined into one
//! [`ScopePolicy`] that every new scan - from gRPC or RabbitMQ - must fit.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use ipnet::IpNet;
use portfleet_core::{
    AddrRange, ScopePolicy,
    policy::{Exclusion, default_deny},
};

use crate::store::{Store, StoreError};

/// Rules are re-read at most this often; a change applies to new scans at
/// once all the same, on every controller: storing a scan checked against
/// an older version fails, and the scan is checked again.
const REFRESH: Duration = Duration::from_secs(2);

/// The policy and when it was read.
type Cached = Option<(Instant, Arc<CurrentPolicy>)>;

/// The policy in force and the version of the rules it was built from:
/// scans checked against it are stored only while that version is current.
#[derive(Debug)]
pub struct CurrentPolicy {
    pub version: i64,
    pub policy: ScopePolicy,
}

impl std::ops::Deref for CurrentPolicy {
    type Target = ScopePolicy;

    fn deref(&self) -> &ScopePolicy {
        &self.policy
    }
}

#[derive(Clone)]
pub struct PolicySource {
    store: Store,
    builtin: Arc<Vec<IpNet>>,
    cache: Arc<Mutex<Cached>>,
}

impl std::fmt::Debug for PolicySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySource").field("builtin", &self.builtin.len()).finish_non_exhaustive()
    }
}

/// Why `range` (out of scope) is refused, naming the rule: the part of a
/// refusal after "`range` may not be scanned: ". "Allows nothing yet" only
/// when there is no allow rule at all.
pub fn refusal(policy: &ScopePolicy, range: AddrRange) -> String {
    let ip = range.first();
    // The address the reason is about: "it" when the range is that one.
    let subject = if range.len() == 1 { "it".to_string() } else { ip.to_string() };
    match policy.exclusion(ip) {
        Some(Exclusion::NoAllowRule) | None => {
            "the scope policy allows nothing yet (serve --allow CIDR,...; docs/security.md)".into()
        }
        Some(Exclusion::Denied(rule)) => format!("{subject} is denied by the rule deny {rule}"),
        Some(Exclusion::NotAllowed) => {
            format!("{subject} is outside every allow rule of the scope policy (docs/security.md)")
        }
        Some(Exclusion::Builtin(entry)) if default_deny().contains(&entry) => format!(
            "{subject} is in the built-in deny-list ({entry}); an allow rule inside {entry} opts in \
             (docs/security.md)"
        ),
        Some(Exclusion::Builtin(_)) => format!("{subject} is an address of this controller's host"),
    }
}

/// This host's addresses (never a scan target: scanning the controller
/// from its own agents is a misconfiguration, not a scan).
pub fn own_addresses() -> Vec<IpNet> {
    match if_addrs::get_if_addrs() {
        Ok(ifs) => ifs.into_iter().map(|i| IpNet::from(portfleet_core::canonical_ip(i.ip()))).collect(),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list this host's addresses; they are not in the deny-list");
            Vec::new()
        }
    }
}

impl PolicySource {
    pub fn new(store: Store) -> Self {
        let builtin = [default_deny(), own_addresses()].concat();
        Self { store, builtin: Arc::new(builtin), cache: Default::default() }
    }

    /// The built-in deny-list: defaults plus this host's addresses.
    pub fn builtin(&self) -> &[IpNet] {
        &self.builtin
    }

    /// Forgets the cached policy (this controller changed the rules).
    pub fn invalidate(&self) {
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// The policy now in force.
    pub async fn current(&self) -> Result<Arc<CurrentPolicy>, StoreError> {
        if let Some((at, p)) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).as_ref()
            && at.elapsed() < REFRESH
        {
            return Ok(p.clone());
        }
        let (version, rules) = self.store.versioned_scope_rules().await?;
        let policy =
            Arc::new(CurrentPolicy { version, policy: ScopePolicy::new(&rules.allow, &rules.deny, &self.builtin) });
        *self.cache.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), policy.clone()));
        Ok(policy)
    }
}
