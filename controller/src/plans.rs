//! Stored scans' plans, decoded once and shared: the scheduler needs a
//! scan's parameters for every Assign and its address set for every rate
//! pass; sessions need its index space to map every reported port to its
//! position (which also proves the port belongs to the scan). What a plan
//! holds never changes once the scan is stored, so a cached plan is never
//! stale; the cache is bounded and refills from the database.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex},
};

use portfleet_core::{AddressSet, PortSet, ScanSpace, ScanType, permutation::Permutation};
use portfleet_telemetry::otel::TraceParent;
use uuid::Uuid;

use crate::store::{ScanParams, Store, StoreError};

/// Plans kept before the least needed are dropped.
const CAPACITY: usize = 1024;

/// One scan's plan, decoded.
#[derive(Debug)]
pub struct ScanPlan {
    pub id: Uuid,
    pub scan_type: ScanType,
    /// The canonical port spec and address ranges, as agents rebuild the
    /// space from them.
    pub ports: String,
    pub address_ranges: Vec<String>,
    pub retries: u32,
    pub seed: u64,
    pub probes_planned: u64,
    /// Probes per second for the whole scan.
    pub rate: u32,
    pub space: ScanSpace,
    /// Identify open ports; see [`crate::scans::DEFAULT_PORT_THRESHOLD`].
    pub identify: bool,
    pub port_threshold: u32,
    /// Named addresses, each with its names joined by ',': agents use them
    /// as SNI and HTTP Host when identifying.
    pub hostnames: Vec<(IpAddr, String)>,
    /// The trace context each Assign's span continues (the span that
    /// created the scan), when the scan is traced.
    pub trace_parent: Option<TraceParent>,
}

impl ScanPlan {
    fn decode(p: ScanParams, hostnames: Vec<(IpAddr, String)>) -> Result<Self, StoreError> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| StoreError::Corrupt(format!("scan {} {what}: {e}", p.id));
        let scan_type = ScanType::parse(&p.scan_type).ok_or_else(|| corrupt("scan_type", &p.scan_type))?;
        let addrs = AddressSet::parse_ranges(&p.address_ranges).map_err(|e| corrupt("address_ranges", &e))?;
        let ports = PortSet::parse(&p.ports).map_err(|e| corrupt("ports", &e))?;
        // The seed is stored as its bit pattern (bigint); agents read the same.
        let seed = u64::from_ne_bytes(p.seed.to_ne_bytes());
        let mut space = ScanSpace::new(addrs, ports, seed, Permutation::MAX_LEN).map_err(|e| corrupt("plan", &e))?;
        if !p.limited_ranges.is_empty() {
            let addrs = AddressSet::parse_ranges(&p.limited_ranges).map_err(|e| corrupt("limited_ranges", &e))?;
            let ports = PortSet::parse(&p.limited_ports).map_err(|e| corrupt("limited_ports", &e))?;
            space = space.with_limited(portfleet_core::space::Limited { addrs, ports });
        }
        Ok(Self {
            id: p.id,
            scan_type,
            ports: p.ports,
            address_ranges: p.address_ranges,
            retries: u32::try_from(p.retries).map_err(|e| corrupt("retries", &e))?,
            seed,
            probes_planned: u64::try_from(p.probes_planned).map_err(|e| corrupt("probes_planned", &e))?,
            rate: u32::try_from(p.rate.max(1)).map_err(|e| corrupt("rate", &e))?,
            space,
            identify: p.identify,
            port_threshold: u32::try_from(p.port_threshold).map_err(|e| corrupt("port_threshold", &e))?,
            hostnames,
            // Only ever written checked; anything else is no context at all.
            trace_parent: p.trace_parent.as_deref().and_then(TraceParent::parse),
        })
    }

    pub fn addresses(&self) -> &AddressSet {
        self.space.addresses()
    }
}

/// The cache. Cheap to clone; every clone shares the plans.
#[derive(Clone, Debug)]
pub struct ScanPlans {
    store: Store,
    map: Arc<Mutex<HashMap<Uuid, Arc<ScanPlan>>>>,
}

impl ScanPlans {
    pub fn new(store: Store) -> Self {
        Self { store, map: Default::default() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Arc<ScanPlan>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A scan's plan, or `None` for an unknown scan.
    pub async fn get(&self, id: Uuid) -> Result<Option<Arc<ScanPlan>>, StoreError> {
        if let Some(p) = self.lock().get(&id) {
            return Ok(Some(p.clone()));
        }
        Ok(self.load(&[id]).await?.remove(&id))
    }

    /// The plans of `ids` (unknown scans left out), reading the missing
    /// ones in one query and making room by dropping plans not asked for.
    pub async fn get_many(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Arc<ScanPlan>>, StoreError> {
        let mut found = HashMap::with_capacity(ids.len());
        let mut missing = Vec::new();
        {
            let map = self.lock();
            for id in ids {
                match map.get(id) {
                    Some(p) => {
                        found.insert(*id, p.clone());
                    }
                    None => missing.push(*id),
                }
            }
        }
        if !missing.is_empty() {
            found.extend(self.load(&missing).await?);
        }
        let keep: HashSet<&Uuid> = ids.iter().collect();
        let mut map = self.lock();
        if map.len() > CAPACITY {
            map.retain(|id, _| keep.contains(id));
        }
        Ok(found)
    }

    async fn load(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Arc<ScanPlan>>, StoreError> {
        let rows = self.store.scan_params_many(ids).await?;
        let identifying: Vec<Uuid> = rows.iter().filter(|r| r.identify).map(|r| r.id).collect();
        let mut names: HashMap<Uuid, Vec<(IpAddr, String)>> = HashMap::new();
        if !identifying.is_empty() {
            for h in self.store.scan_hosts_many(&identifying).await? {
                names.entry(h.scan_id).or_default().push((h.ip, h.hostname));
            }
        }
        let mut loaded = HashMap::with_capacity(rows.len());
        for row in rows {
            let hostnames = names.remove(&row.id).unwrap_or_default();
            // One bad row must not stop the scheduling of every other scan:
            // that scan is treated as unknown (its work is never assigned).
            match ScanPlan::decode(row, hostnames) {
                Ok(plan) => {
                    loaded.insert(plan.id, Arc::new(plan));
                }
                Err(e) => tracing::error!(error = %e, "a stored scan cannot be planned; it is skipped"),
            }
        }
        let mut map = self.lock();
        if map.len() + loaded.len() > CAPACITY {
            map.clear();
        }
        map.extend(loaded.iter().map(|(id, p)| (*id, p.clone())));
        Ok(loaded)
    }
}
