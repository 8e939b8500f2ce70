//! Service identification: what answers on an open port.
//!
//! A second stage after discovery. Each open port the engine finds is
//! queued ([`Pipeline`], bounded: a full queue pauses reading the engine's
//! events, which in turn paces the engine) and identified by a task of its
//! own (`port`): banner, HTTP and TLS ([`http`], [`tls`]), portfleet's own
//! rules ([`rules`], `agent/rules/services.rules`) and, when installed,
//! nmap's service probe database ([`nmap`], read at run time). Results
//! leave the pipeline in the order they were found, each checkpoint after
//! the results below it, so a checkpoint still means "everything below is
//! reported" - identified included - and whoever resumes a shard from it
//! identifies what lies above.
//!
//! Every identification connection passes one [`Gate`]: the agent's scope
//! policy (as every probe does), a token under the scan's rate (charged to
//! the engine, so probes and connections share it), a slot of the agent's
//! concurrency and one of the address's.

pub mod http;
pub mod nmap;
mod pipeline;
mod port;
pub mod rules;
pub mod tls;

use std::{
    collections::HashMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use portfleet_core::{AddressSet, Service};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use pipeline::{Item, Pipeline};

use crate::engine::{EngineControl, Finding, rate::AsyncRateLimiter};

/// An open port with what answers on it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identified {
    pub finding: Finding,
    /// `None` when the scan does not identify, or the address answered on
    /// more ports than the scan's threshold.
    pub service: Option<Service>,
    /// The address answered on more ports than the threshold (a SYN proxy
    /// or tarpit): reported, not identified.
    pub answers_everything: bool,
}

impl Identified {
    /// A finding reported as found, unidentified.
    pub fn plain(finding: Finding) -> Self {
        Self { finding, service: None, answers_everything: false }
    }
}

/// The agent's identification settings (flags of `run` and `scan`).
#[derive(Clone, Debug)]
pub struct Options {
    /// Identifications in flight at once, all scans together.
    pub concurrency: usize,
    /// Identifications in flight per address.
    pub per_host: usize,
    pub connect_timeout: Duration,
    /// Longest wait for a response to a probe.
    pub read_timeout: Duration,
    /// How long the first connection listens for a banner.
    pub banner_wait: Duration,
    /// All of one port's identification.
    pub port_deadline: Duration,
    /// nmap's rarity cut-off (0-9), as `nmap --version-intensity`.
    pub intensity: u8,
    /// Our protocol probes tried per port, at most.
    pub max_probes: usize,
    /// Open ports queued per shard before the engine is paused.
    pub queue: usize,
    /// nmap's `nmap-service-probes`; `None` for the built-in rules only.
    pub nmap_probes: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            concurrency: 512,
            per_host: 8,
            connect_timeout: Duration::from_secs(3),
            read_timeout: Duration::from_secs(3),
            banner_wait: Duration::from_millis(1500),
            port_deadline: Duration::from_secs(20),
            intensity: 7,
            max_probes: 8,
            queue: 4096,
            nmap_probes: None,
        }
    }
}

/// Why identification cannot start.
#[derive(Debug, thiserror::Error)]
pub enum IdentifyError {
    #[error(transparent)]
    Nmap(#[from] nmap::NmapError),
}

/// The agent's identification stage: settings, rules and the limits all
/// scans share. One per process.
#[derive(Debug)]
pub struct Identifier {
    options: Options,
    rules: &'static rules::Rules,
    nmap: Option<nmap::NmapDb>,
    /// nmap's port table, read with its probes.
    ports: Option<nmap::PortTable>,
    slots: Arc<Semaphore>,
    /// Per-address slots, dropped when no identification holds them.
    hosts: Mutex<HashMap<IpAddr, Arc<Semaphore>>>,
}

impl Identifier {
    /// Loads nmap's database when `options.nmap_probes` names one.
    pub fn new(options: Options) -> Result<Self, IdentifyError> {
        let nmap = match &options.nmap_probes {
            Some(path) => Some(nmap::NmapDb::load(path)?),
            None => None,
        };
        let ports = options.nmap_probes.as_deref().and_then(nmap::PortTable::beside);
        Ok(Self {
            ports,
            slots: Arc::new(Semaphore::new(options.concurrency.max(1))),
            options,
            rules: rules::Rules::builtin(),
            nmap,
            hosts: Mutex::new(HashMap::new()),
        })
    }

    /// nmap's database at its usual place, when installed there.
    pub fn default_nmap_probes() -> Option<PathBuf> {
        let path = Path::new(nmap::NmapDb::DEFAULT_PATH);
        path.exists().then(|| path.to_path_buf())
    }

    pub fn options(&self) -> &Options {
        &self.options
    }

    /// The service `port` usually has: nmap's table when loaded, else
    /// ours.
    fn guess(&self, port: u16) -> Option<&str> {
        self.ports.as_ref().and_then(|t| t.name(port)).or_else(|| self.rules.guess(port))
    }

    /// "built-in rules" or "built-in rules and nmap's database (N probes)".
    pub fn describe(&self) -> String {
        match &self.nmap {
            Some(db) => format!("built-in rules and nmap's service probes ({} probes)", db.len()),
            None => "built-in rules".to_string(),
        }
    }

    /// Identifies one port under `gate`.
    pub async fn identify(&self, ip: IpAddr, port: u16, names: &[String], gate: &Gate) -> Service {
        // The address's slot first: ports waiting for a busy address hold
        // none of the agent's slots meanwhile.
        let _host = self.host_slot(ip).await;
        let _slot = self.slots.clone().acquire_owned().await;
        // Boxed: the driver's state (read buffers and all) is allocated
        // only once it has its slots, not for every queued port.
        Box::pin(port::identify(port::Reach { ip, port, names, identifier: self, gate })).await
    }

    async fn host_slot(&self, ip: IpAddr) -> Option<HostSlot<'_>> {
        let sem = {
            let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
            hosts.entry(ip).or_insert_with(|| Arc::new(Semaphore::new(self.options.per_host.max(1)))).clone()
        };
        let permit = sem.acquire_owned().await.ok()?;
        Some(HostSlot { identifier: self, ip, permit: Some(permit) })
    }
}

/// A slot of one address; the address's entry goes when the last slot
/// does, so the map holds only addresses being identified.
struct HostSlot<'a> {
    identifier: &'a Identifier,
    ip: IpAddr,
    permit: Option<OwnedSemaphorePermit>,
}

impl Drop for HostSlot<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut hosts = self.identifier.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(sem) = hosts.get(&self.ip)
            && Arc::strong_count(sem) == 1
            && sem.available_permits() == self.identifier.options.per_host.max(1)
        {
            hosts.remove(&self.ip);
        }
    }
}

/// What every identification connection of one shard (or standalone scan)
/// passes: the scope policy, the scan's rate, and the engine's pause.
#[derive(Debug)]
pub struct Gate {
    /// The agent's deny set: an address in it is never connected to.
    deny: Arc<AddressSet>,
    pub(super) control: Arc<EngineControl>,
    limiter: AsyncRateLimiter,
}

impl Gate {
    pub fn new(deny: Arc<AddressSet>, control: Arc<EngineControl>) -> Self {
        Self { deny, limiter: AsyncRateLimiter::beside(control.clone()), control }
    }

    /// Waits until a connection may open: not while the engine is held
    /// (the controller is silent or results are not being taken), and
    /// within the rate.
    async fn admit(&self) {
        while self.control.is_paused() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.limiter.acquire().await;
    }

    /// The agent's own scope check, as for every probe.
    pub fn allows(&self, ip: IpAddr) -> bool {
        !self.deny.contains(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A queued port costs its task's future, for every port the queue
    /// holds: the driver's buffers are not part of it.
    #[test]
    fn a_queued_identification_is_small() {
        let identifier = Identifier::new(Options::default()).unwrap();
        let control = Arc::new(EngineControl::new(1_000));
        let gate = Gate::new(Arc::new(AddressSet::default()), control);
        let names = Vec::new();
        let queued = identifier.identify("192.0.2.1".parse().unwrap(), 22, &names, &gate);
        assert!(std::mem::size_of_val(&queued) < 1024, "{} bytes", std::mem::size_of_val(&queued));
    }
}
